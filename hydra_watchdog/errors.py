"""Why an action did not succeed: the one vocabulary of `ActionResult.error_kind`.

The values are public: journald's HYDRA_ERROR_KIND field, status.json and the metrics carry
them, so a value never changes once released (add members, never rename them). Each kind
belongs to one family, the question an operator asks first: "did the watchdog hold back on
purpose, did the OS or a tool fail, did TabbyAPI / the proxy answer badly, or NVML?"

    family   kind                meaning
    -------  ------------------  ----------------------------------------------------------------
    none     ""                  no error: OK, DRY_RUN, IN_PROGRESS
    refused  disabled            switched off in the config (orphans.enabled, gpu_reset.enabled)
    (by us)  identity_changed    the pid is now another process (or gone, or in another PID
                                 namespace): not signalled
             in_unit             the process is (or may be) in the unit's cgroup now
             cannot_verify       could not tell who uses the GPU: no reset blind
             foreign_gpu_user    a non-TabbyAPI process uses the GPU: no reset
             wrong_unit          a unit other than the configured one: not touched
             unavailable         no systemd here: the unit command was not attempted
             load_in_flight      a model load is already running: never two at once
             skipped             an earlier action of the same decision did not succeed
    os       no_permission       not allowed (signal, pidfd, NVML without CAP_SYS_ADMIN)
    (a tool  not_found           the program (nvidia-smi) or the GPU does not exist
    or the   exec_failed         the program exists but could not be started
    kernel)  timeout             no answer in time (a tool, an NVML call, an HTTP request)
             command_failed      the tool ran and said no (non-zero exit, systemctl refused)
             unkillable          survived SIGKILL (uninterruptible sleep?)
             exception           an actuator raised: a bug in the watchdog
    load     load_error          TabbyAPI ended the load with an error, or it timed out
             load_permanent      TabbyAPI's error says no retry can help (HTTP 4xx, "no longer
                                 supported", "not installed"): not retried as it is
             cancelled           the load was cancelled (shutdown, the backstop)
    http     refused             nothing listening, or the URL is unusable
    (the     http_error          an HTTP status that is not the expected one
    fallback bad_body            malformed JSON, wrong shape, protocol garbage
    route)   unauthorized        401/403
             withheld            not sent: the listener is not verified
             local_error         the watchdog itself could not send (descriptors, memory)
    nvml     not_supported       the card or driver cannot do it
    (power   gpu_lost            the GPU fell off the bus
    limit)   driver_not_loaded   no NVIDIA driver
             library_not_found   no libnvidia-ml
             function_not_found  the library is too old for the call
             library_mismatch    library and kernel module versions differ
             invalid_argument    a value the card refuses
             other               any other NVML error

The http kinds are observation.Outcome's values and the nvml kinds observation.NvmlErrorKind's
(the actuators pass those through by value).

A kind shared by two families (timeout, no_permission, not_found) has one member: the action's
detail says which tool or call it was.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorFamily(StrEnum):
    NONE = "none"
    REFUSED = "refused"  # the watchdog held back on purpose: a safety rule or the config said no
    OS = "os"  # the OS or a tool failed us
    LOAD = "load"  # a model load ended badly
    HTTP = "http"  # an HTTP answer (the fallback route) was not the expected one
    NVML = "nvml"  # the NVML library said no


class ErrorKind(StrEnum):
    NONE = ""

    # refused by us
    DISABLED = "disabled"
    IDENTITY_CHANGED = "identity_changed"
    IN_UNIT = "in_unit"
    CANNOT_VERIFY = "cannot_verify"
    FOREIGN_GPU_USER = "foreign_gpu_user"
    WRONG_UNIT = "wrong_unit"
    UNAVAILABLE = "unavailable"
    LOAD_IN_FLIGHT = "load_in_flight"
    SKIPPED = "skipped"

    # failed at the OS or in a tool
    NO_PERMISSION = "no_permission"
    NOT_FOUND = "not_found"
    EXEC_FAILED = "exec_failed"
    TIMEOUT = "timeout"
    COMMAND_FAILED = "command_failed"
    UNKILLABLE = "unkillable"
    EXCEPTION = "exception"

    # a model load
    LOAD_ERROR = "load_error"
    LOAD_PERMANENT = "load_permanent"
    CANCELLED = "cancelled"

    # an HTTP answer (observation.Outcome's values)
    REFUSED = "refused"
    HTTP_ERROR = "http_error"
    BAD_BODY = "bad_body"
    UNAUTHORIZED = "unauthorized"
    WITHHELD = "withheld"
    LOCAL_ERROR = "local_error"

    # NVML (observation.NvmlErrorKind's values)
    NOT_SUPPORTED = "not_supported"
    GPU_LOST = "gpu_lost"
    DRIVER_NOT_LOADED = "driver_not_loaded"
    LIBRARY_NOT_FOUND = "library_not_found"
    FUNCTION_NOT_FOUND = "function_not_found"
    LIBRARY_MISMATCH = "library_mismatch"
    INVALID_ARGUMENT = "invalid_argument"
    OTHER = "other"

    @property
    def family(self) -> ErrorFamily:
        return FAMILY[self]


_K, _F = ErrorKind, ErrorFamily
FAMILY: dict[ErrorKind, ErrorFamily] = {
    _K.NONE: _F.NONE,
    **dict.fromkeys(
        (
            _K.DISABLED,
            _K.IDENTITY_CHANGED,
            _K.IN_UNIT,
            _K.CANNOT_VERIFY,
            _K.FOREIGN_GPU_USER,
            _K.WRONG_UNIT,
            _K.UNAVAILABLE,
            _K.LOAD_IN_FLIGHT,
            _K.SKIPPED,
        ),
        _F.REFUSED,
    ),
    **dict.fromkeys(
        (
            _K.NO_PERMISSION,
            _K.NOT_FOUND,
            _K.EXEC_FAILED,
            _K.TIMEOUT,
            _K.COMMAND_FAILED,
            _K.UNKILLABLE,
            _K.EXCEPTION,
        ),
        _F.OS,
    ),
    **dict.fromkeys((_K.LOAD_ERROR, _K.LOAD_PERMANENT, _K.CANCELLED), _F.LOAD),
    **dict.fromkeys(
        (
            _K.REFUSED,
            _K.HTTP_ERROR,
            _K.BAD_BODY,
            _K.UNAUTHORIZED,
            _K.WITHHELD,
            _K.LOCAL_ERROR,
        ),
        _F.HTTP,
    ),
    **dict.fromkeys(
        (
            _K.NOT_SUPPORTED,
            _K.GPU_LOST,
            _K.DRIVER_NOT_LOADED,
            _K.LIBRARY_NOT_FOUND,
            _K.FUNCTION_NOT_FOUND,
            _K.LIBRARY_MISMATCH,
            _K.INVALID_ARGUMENT,
            _K.OTHER,
        ),
        _F.NVML,
    ),
}
