"""plugboard control handler (WIT world `control` of plugboard:plugin@0.1.0)
that narrows a control request sent to a group down to the members with
given roles.

Per request:
  - a payload that is a JSON object with a `"roles"` array of strings, sent
    to a group (`group_id`): the key-value store key `roles:<group id>`
    holds a JSON object mapping user id -> role; the request is delivered
    only to its targets whose role is one of `roles`. A missing key, or no
    target left, rejects the request.
  - `"roles"` without a group, or `"roles"` that is not an array of
    strings: rejected.
  - anything else: delivered unchanged.
Payload and priority are never changed; the store key is read once per
request.

Config: none; any key is refused at init.

Every failure is returned as the WIT `hook-error` (by raising
`Err(HookError_...)`): a malformed `roles:` value is `bad-config` naming the
key, a failed store read `host-failure`. Any other exception escaping an
export would trap the instance, so the exports turn anything unexpected into
`other`. Nothing is printed: the component is built with --stub-wasi, where
print() traps.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.control_handler import (
    ControlRequest,
    Decision,
    Decision_Deliver,
    Decision_Reject,
    Delivery,
    Plan,
)
from wit_world.imports import host
from wit_world.imports.types import (
    HookError_BadConfig,
    HookError_HostFailure,
    HookError_Other,
    LogLevel,
    Pair,
)


def roles_key(group_id: str) -> str:
    return f"roles:{group_id}"


# What `requested_roles` answers for a payload without `roles`.
NO_ROLES = object()


def requested_roles(payload: str):
    """The payload's `roles` value, whatever its type, or NO_ROLES when the
    payload is not a JSON object with `roles` (then the request is
    delivered unchanged)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
        return NO_ROLES
    if not isinstance(data, dict) or "roles" not in data:
        return NO_ROLES
    return data["roles"]


def is_role_list(roles) -> bool:
    return isinstance(roles, list) and all(isinstance(role, str) for role in roles)


def parse_members(key: str, value: bytes) -> dict:
    """The user id -> role map in the value of store key `key`. Anything but
    a JSON object of strings is `Err(HookError_BadConfig)` naming the key."""
    try:
        members = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise Err(HookError_BadConfig(f"key-value key `{key}` is not JSON: {e}"))
    if not isinstance(members, dict) or not all(isinstance(role, str) for role in members.values()):
        raise Err(HookError_BadConfig(f"key-value key `{key}` must hold a JSON object mapping user ids to roles"))
    return members


def unchanged(request: ControlRequest) -> Decision:
    return deliver(request, request.targets)


def deliver(request: ControlRequest, targets: list[str]) -> Decision:
    return Decision_Deliver(Plan(request.payload, request.priority, [Delivery(user_id, None) for user_id in targets]))


def decide(request: ControlRequest, roles: list[str], members: dict | None) -> Decision:
    """The decision on a request to group `request.group_id` that asks for
    `roles`, given the group's stored members (None: no key)."""
    group_id = request.group_id
    if members is None:
        return Decision_Reject(f"no roles known for group `{group_id}`")
    targets = [user_id for user_id in request.targets if members.get(user_id) in roles]
    if not targets:
        return Decision_Reject(f"no member of `{group_id}` has a role in [{', '.join(roles)}]")
    return deliver(request, targets)


def kv_error_text(error) -> str:
    """`Storage: disk full` for `KvError_Storage("disk full")`."""
    kind = type(error).__name__.removeprefix("KvError_")
    return f"{kind}: {getattr(error, 'value', error)}"


def _unexpected(what: str, e: Exception) -> Err:
    return Err(HookError_Other(f"role-targets: {what} failed: {type(e).__name__}: {e}"))


class Plugin(exports.Plugin):
    def init(self, config: list[Pair]) -> None:
        try:
            if config:
                raise Err(HookError_BadConfig(f"unknown config key `{config[0].key}` (role-targets takes no config)"))
        except Err:
            raise
        except Exception as e:
            raise _unexpected("init", e)


class ControlHandler(exports.ControlHandler):
    def handle(self, request: ControlRequest) -> Decision:
        try:
            roles = requested_roles(request.payload)
            if roles is NO_ROLES:
                return unchanged(request)
            if request.group_id is None:
                return Decision_Reject("`roles` needs a group target")
            if not is_role_list(roles):
                # Delivering to every target would widen what the sender asked for.
                return Decision_Reject("`roles` must be an array of strings")
            key = roles_key(request.group_id)
            try:
                value = host.kv_get(key)
            except Err as e:
                # The host raises Err(KvError_...): answer with a hook-error,
                # not the kv-error, which is not what `handle` returns.
                raise Err(HookError_HostFailure(f"key-value store: reading `{key}`: {kv_error_text(e.value)}"))
            members = None if value is None else parse_members(key, value)
            decision = decide(request, roles, members)
            kept = "none" if isinstance(decision, Decision_Reject) else str(len(decision.value.targets))
            host.log(
                LogLevel.DEBUG,
                f"{request.kind} {request.id} for roles [{', '.join(roles)}] of {request.group_id}: kept {kept} of {len(request.targets)} targets",
                [
                    Pair("id", request.id),
                    Pair("group_id", request.group_id),
                    Pair("kept", kept),
                ],
            )
            return decision
        except Err:
            raise
        except Exception as e:
            raise _unexpected("handle", e)
