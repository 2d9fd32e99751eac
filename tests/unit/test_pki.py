"""Certificates: chained to the CA, naming the right identity and addresses."""

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentkube.devenv import pki

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca():
    return pki.new_ca("test-ca", NOW)


def _load(pair: pki.KeyPair) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pair.cert_pem)


def test_client_certificate_carries_user_and_groups_and_is_signed_by_the_ca(ca):
    ca_pair, ca_key = ca
    pair = pki.issue(ca_pair, ca_key, "alice", NOW, organizations=("system:masters", "devs"), client=True)
    cert = _load(pair)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:masters", "devs"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(_load(ca_pair))
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc


def test_server_certificate_names_its_addresses(ca):
    ca_pair, ca_key = ca
    pair = pki.issue(ca_pair, ca_key, "srv", NOW, dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True)
    names = _load(pair).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_ca_is_a_ca_and_leaves_are_not(ca):
    ca_pair, ca_key = ca
    assert _load(ca_pair).extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf = pki.issue(ca_pair, ca_key, "x", NOW, client=True)
    assert not _load(leaf).extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_certificate_must_have_a_purpose(ca):
    with pytest.raises(ValueError):
        pki.issue(*ca, "nothing", NOW)


def test_keys_are_pem_encoded_p256():
    key = pki.new_key()
    assert isinstance(key.curve, ec.SECP256R1)
    assert pki.key_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pki.public_key_pem(key).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_environment_credentials_name_each_identity_and_chain_to_the_right_ca():
    from agentkube.devenv.cluster import issue_credentials
    from agentkube.devenv.config import CLIENT_CERTIFICATES, FRONT_PROXY_CLIENT

    credentials = issue_credentials(NOW)
    ca, front_proxy_ca = _load(credentials["ca"]), _load(credentials["front-proxy-ca"])
    for name, identity in CLIENT_CERTIFICATES.items():
        cert = _load(credentials[name])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.user
        assert tuple(a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)) == identity.groups
    # The front proxy's CA signs nothing else, so no ordinary client can pose as the front proxy.
    front_proxy = _load(credentials["front-proxy-client"])
    front_proxy.verify_directly_issued_by(front_proxy_ca)
    assert front_proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == FRONT_PROXY_CLIENT.user
    apiserver_names = _load(credentials["apiserver"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in apiserver_names.get_values_for_type(x509.DNSName)
