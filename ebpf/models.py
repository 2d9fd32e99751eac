"""The node agent's API schemas: one source of truth for requests, responses, records and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from agentkube.contract import (
    DNS_LABEL,
    CallIntent,
    Duration,
    Envelope,
    Limits,
    LimitSource,
    Quantity,
    Tools,
    duration_seconds,
    quantity_bytes,
    quantity_cores,
)

MAX_REQUEST_BYTES = 64 * 1024
MAX_ARGV_ITEMS = 1024
MAX_ARG_CHARS = 16 * 1024


def _label(value: str) -> str:
    if not DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-', at most 63)")
    return value


def _check_argv(argv: list[str]) -> list[str]:
    for arg in argv:
        if len(arg) > MAX_ARG_CHARS or "\0" in arg:
            raise ValueError(f"argv items must be at most {MAX_ARG_CHARS} characters without NUL")
    return argv


Argv = Annotated[list[str], Field(min_length=1, max_length=MAX_ARGV_ITEMS), AfterValidator(_check_argv)]


# Environment variables of a call: names as Kubernetes allows them in a container's env, values without NUL
# (the held program's frame is NUL-separated).
MAX_ENV_ITEMS = 256
EnvName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
EnvValue = Annotated[str, Field(max_length=32768, pattern=r"^[^\x00]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SandboxRef(Strict):
    name: str
    namespace: str = "default"

    @field_validator("name", "namespace")
    @classmethod
    def _labels(cls, value: str) -> str:
        return _label(value)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class EnvelopeSpec(Strict):
    """The numeric envelope of a sandbox in the CRD's units (a pod's: its container's limits)."""

    memory: Quantity = "2Gi"
    cpu: Quantity = "1"
    pids: int = Field(default=1024, gt=0, le=4_194_304)
    timeout: Duration = "1h"

    def envelope(self) -> Envelope:
        return Envelope(memory=quantity_bytes(self.memory), cpu=quantity_cores(self.cpu), pids=self.pids,
                        timeout=duration_seconds(self.timeout))


class KubernetesContainer(Strict):
    """Where a sandbox's container lives on this node (the operator knows these from the pod's status)."""

    pod_uid: str = Field(pattern=r"^[0-9a-f-]{36}$")
    container_id: str = Field(pattern=r"^([a-z]+://)?[0-9a-f]{12,64}$")
    qos: str = Field(default="burstable", pattern=r"^(guaranteed|burstable|besteffort)$")


class SandboxCreate(SandboxRef):
    envelope: EnvelopeSpec = EnvelopeSpec()
    # The sandbox's default intent and its own profiles (an AgentSandbox's spec.tools): what its calls get
    # when they ask for nothing, and the networks they may ask for.
    tools: Tools = Tools()
    # --local: a process to become the sandbox's main process (moved into its `agent` leaf).
    pid: int | None = Field(default=None, gt=1)
    kubernetes: KubernetesContainer | None = None


class SandboxStatus(SandboxRef):
    cgroup: str
    envelope: Envelope
    defaults: Limits
    running_calls: int
    last_activity: float = Field(description="unix time of the last call's start or end")


class CallCreate(SandboxRef):
    """Ask for a held process to become a tool call."""

    pid: int = Field(gt=1)
    argv: Argv
    intent: CallIntent = CallIntent()


class PoolFill(SandboxRef):
    """Ask for a held process (the runtime's child, not yet a call) to wait in a fresh call cgroup of the
    sandbox, for a call to come: the warm pool."""

    pid: int = Field(gt=1)


class PoolSlot(Strict):
    call_id: str
    cgroup: str


class CallStart(SandboxRef):
    """Start a call in a slot of the warm pool (its held process is released by the runtime once answered)."""

    call_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    argv: Argv
    intent: CallIntent = CallIntent()


class CallPlaced(Strict):
    call_id: str
    cgroup: str
    limits: Limits
    sources: dict[str, LimitSource]


class CallFinish(Strict):
    """What the runtime saw of the call's first process."""

    exit_code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)


class Usage(Strict):
    duration_seconds: float
    exit_code: int | None
    signal: int | None
    timed_out: bool
    peak_memory_bytes: int
    cpu_seconds: float
    throttled_seconds: float
    oom_kills: int
    processes_spawned: int
    connections_blocked: int
    dns_refused: int = Field(default=0, description="DNS lookups refused: the call's network does not allow the name")
    memory_high_events: int
    pids_limit_hits: int


class CallRecord(Strict):
    """A call as the agent keeps it on disk while it runs and appends it to the audit log when done."""

    call_id: str
    sandbox: str
    namespace: str
    profile: str
    signature: str
    argv: list[str]
    pid: int
    cgroup_paths: dict[str, str]
    cgroup_id: int
    limits: Limits
    sources: dict[str, LimitSource]
    started_at: float
    deadline: float
    timed_out: bool = False
    finished_at: float | None = None
    usage: Usage | None = None
    recovered: bool = Field(default=False, description="the node agent restarted while this call ran")
    memory_high_first_seen: float | None = Field(
        default=None, description="unix time the agent was told the call first crossed memory.high")
    executed: list[str] = Field(default_factory=list, description="programs the call executed (first 64)")


MAX_OUTPUT_BYTES = 1024 * 1024  # per stream; the rest is drained and counted, not kept
# The start of the node agent's 404 message for a sandbox it does not know (yet): the runtime waits on it.
UNREGISTERED = "no sandbox"


class RunRequest(Strict):
    """SDK → sandbox runtime: run one command as a tool call. The runtime passes the intent on as it came:
    the node agent is the one judge of it (the SDK checks it first, to fail early)."""

    argv: Argv
    intent: dict[str, Any] = Field(default_factory=dict)
    stdin: str | None = Field(default=None, max_length=MAX_REQUEST_BYTES // 2)
    cwd: str | None = None
    # Variables set for this call on top of the runtime's environment. The gateway puts a pooled sandbox's
    # spec.env here on every call: its warm pod was started before the sandbox existed.
    env: dict[EnvName, EnvValue] | None = Field(default=None, max_length=MAX_ENV_ITEMS)


class RunResult(Strict):
    call_id: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_truncated_bytes: int = 0
    stderr_truncated_bytes: int = 0
    limits: Limits
    sources: dict[str, LimitSource]
    usage: Usage


class ErrorBody(Strict):
    error: str


# ----- background processes: tool calls that outlive the request that started them ----------------------

MAX_PROCESS_OUTPUT_BYTES = 1024 * 1024  # per stream of a background process: its newest bytes are kept
MAX_PROCESSES = 16  # background processes a sandbox's runtime keeps, running and finished
MAX_PROCESS_WAIT_SECONDS = 30.0  # the longest one output/wait request is held open (clients ask again)
# The signals a caller may send to a background process, by name (the process group gets it).
PROCESS_SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15, "CONT": 18, "STOP": 19}


class ProcessInfo(Strict):
    """A background process: a tool call whose output is kept (bounded) for any caller to read from any offset."""

    id: str = Field(description="the call's id")
    argv: list[str]
    state: str = Field(pattern=r"^(running|exited)$")
    started_at: float
    limits: Limits
    sources: dict[str, LimitSource]
    stdout_bytes: int = Field(description="bytes the process has written to stdout so far (offsets go up to this)")
    stderr_bytes: int
    exit_code: int | None = None
    signal: int | None = None
    usage: Usage | None = Field(default=None, description="the call's usage, once it has exited")
    error: str | None = Field(default=None, description="why the call could not be finished with the node agent")


class OutputChunk(Strict):
    """Bytes of one stream from `offset` (at or after the one asked for: older bytes than the kept ones are
    gone) to `next`, decoded as UTF-8 (a character cut at the end waits for the next read)."""

    offset: int
    next: int
    data: str


class ProcessOutput(Strict):
    process: ProcessInfo
    stdout: OutputChunk
    stderr: OutputChunk


class StdinWrite(Strict):
    data: str = Field(default="", max_length=MAX_REQUEST_BYTES // 2)
    close: bool = Field(default=False, description="close the process's stdin after writing (it reads EOF)")


class StdinWritten(Strict):
    written: int = Field(description="bytes written (fewer than sent when the process stopped reading)")


class SignalRequest(Strict):
    signal: str = Field(description=f"one of {', '.join(PROCESS_SIGNALS)}")

    @field_validator("signal")
    @classmethod
    def _known(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in PROCESS_SIGNALS:
            raise ValueError(f"{value!r} is not a signal a process may be sent (one of {', '.join(PROCESS_SIGNALS)})")
        return name


class ProcessList(Strict):
    processes: list[ProcessInfo]


# ----- files in the workspace ---------------------------------------------------------------------------

MAX_PATH_CHARS = 4096  # PATH_MAX
MAX_LIST_ENTRIES = 10_000  # one listing's entries; `truncated` says when a directory holds more


class FileEntry(Strict):
    name: str
    type: str = Field(pattern=r"^(file|directory|symlink|other)$")
    size: int
    mode: int = Field(description="permission bits")
    modified: float = Field(description="unix time of the last modification")


class FileList(Strict):
    path: str
    entries: list[FileEntry]
    truncated: bool = False


# ----- warm-pool claims through the gateway ---------------------------------------------------------------

MAX_CLAIM_TTL_SECONDS = 7 * 24 * 3600
MAX_CLAIM_WAIT_SECONDS = 300.0


class ClaimRequest(Strict):
    """SDK → gateway: a new AgentSandbox from a pool (`Sandbox.create(pool=...)`), answered once it runs."""

    env: dict[EnvName, EnvValue] | None = Field(default=None, max_length=MAX_ENV_ITEMS)
    # The sandbox is deleted this long after its creation (spec.lifecycle.expireAfter, shutdownPolicy Delete).
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_CLAIM_TTL_SECONDS)
    wait_seconds: float = Field(default=60.0, gt=0, le=MAX_CLAIM_WAIT_SECONDS)
    # The sandbox's name, chosen by the client so that the claim can be asked again after a lost answer
    # (a gateway restarted mid-claim) and get the same sandbox, not a second one. A DNS-1123 label.
    name: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Claimed(Strict):
    name: str
    namespace: str
    pool: str
    pod_name: str
    warm: bool  # it adopted a warm pod (false: the pool had none ready, and it started cold)
