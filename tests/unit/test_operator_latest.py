"""The operator's store of the newest copy of each object (`latest`): which copy wins, and one holder of an
object's lock at a time."""

import threading
import time

from agentkube.operator.latest import Latest, is_newer


def _body(version: str | None, uid: str = "u1", name: str = "box", **extra) -> dict:
    metadata = {"namespace": "ns", "name": name, "uid": uid, **extra}
    if version is not None:
        metadata["resourceVersion"] = version
    return {"metadata": metadata, "status": {"version": version}}


def test_a_newer_resource_version_wins_compared_as_numbers_not_strings():
    assert is_newer(_body("10"), ("u1", 9))
    assert not is_newer(_body("9"), ("u1", 10))
    assert is_newer(_body("10"), ("u1", 10))  # the same version again: either copy is right


def test_a_copy_of_a_recreated_object_or_an_unreadable_version_always_replaces():
    assert is_newer(_body("5", uid="u2"), ("u1", 9))
    assert is_newer(_body("abc"), ("u1", 9))
    assert is_newer(_body("9"), ("u1", None))
    assert is_newer(_body("1"), None)


def test_an_event_older_than_our_own_write_does_not_replace_the_write():
    store = Latest()
    written = store.saw(_body("20"))
    assert store.saw(_body("19")) == written  # the watch brings an older event after our write's reply
    assert store.get("ns", "box")["status"]["version"] == "20"
    assert store.saw(_body("21"))["status"]["version"] == "21"
    assert store.knows("ns", "box") and not store.knows("ns", "other")
    store.forget("ns", "box")
    assert store.get("ns", "box") is None and not store.knows("ns", "box") and len(store) == 0


def test_copies_are_kept_without_managed_fields_and_the_callers_dict_is_untouched():
    event = _body("3", managedFields=[{"manager": "kubectl"}], labels={"a": "b"})
    kept = Latest().saw(event)
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["labels"] == {"a": "b"}
    assert event["metadata"]["managedFields"] == [{"manager": "kubectl"}]


def test_one_holder_of_an_objects_lock_at_a_time_and_other_objects_are_not_held_up():
    store = Latest()
    inside, most = [0], [0]
    counter_lock = threading.Lock()

    def hold() -> None:
        with store.exclusive("ns", "box"):
            with counter_lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            with counter_lock:
                inside[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(8)]
    with store.exclusive("ns", "other"):  # held throughout: the box's holders go on regardless
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert most[0] == 1
    assert not store._object_locks and not store._users  # no lock outlives its last holder
