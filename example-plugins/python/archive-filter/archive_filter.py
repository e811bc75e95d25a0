"""plugboard conversation filter (WIT world `filter` of plugboard:plugin@0.1.0)
that hides each viewer's archived conversations, caps the unread badge and
can hide conversations that have no message yet.

Per call, for the viewer's page of conversations:
  - the key-value store key `archived:<viewer user id>` holds a JSON array of
    channel references, `person:<id>` or `group:<id>` (exact ids): those
    conversations are dropped. A missing key archives nothing.
  - with `hide_empty` true, conversations without a last message are dropped.
  - an unread count above `max_unread` is rewritten down to `max_unread`.
  - every other conversation is kept.
One verdict per conversation, in order; the store key is read once per call.

Config keys (all optional; any other key is refused at init):
  max_unread   the highest unread count shown, a non-negative integer (default 99)
  hide_empty   `true` or `false` (default false)

Every failure is returned as the WIT `hook-error` (by raising
`Err(HookError_...)`): a malformed `archived:` value is `bad-config` naming
the key, a failed store read `host-failure`, bad config `bad-config` at init.
Any other exception escaping an export would trap the instance, so the
exports turn anything unexpected into `other`. Nothing is printed: the
component is built with --stub-wasi, where print() traps.
"""

import json
from dataclasses import replace

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.conversation_filter import (
    ChannelType,
    Conversation,
    Verdict,
    Verdict_Drop,
    Verdict_Keep,
    Verdict_Rewrite,
    Viewer,
)
from wit_world.imports import host
from wit_world.imports.types import (
    HookError_BadConfig,
    HookError_HostFailure,
    HookError_Other,
    LogLevel,
    Pair,
)

KNOWN_KEYS = ("max_unread", "hide_empty")
DEFAULT_MAX_UNREAD = 99
# The WIT `unread` is a u32: a larger cap could never apply.
U32_MAX = 2**32 - 1
KINDS = {"person": ChannelType.PERSON, "group": ChannelType.GROUP}

_settings = {"max_unread": DEFAULT_MAX_UNREAD, "hide_empty": False}


def parse_settings(config: list[Pair]) -> dict:
    """The settings in `config`, or `Err(HookError_BadConfig)`."""
    settings = {"max_unread": DEFAULT_MAX_UNREAD, "hide_empty": False}
    for pair in config:
        if pair.key not in KNOWN_KEYS:
            raise Err(HookError_BadConfig(f"unknown config key `{pair.key}` (known: {', '.join(KNOWN_KEYS)})"))
        value = pair.value.strip()
        if pair.key == "max_unread":
            # isdigit() alone would accept "²"; int() alone would accept "-1" and "+5".
            if not (value.isascii() and value.isdigit()) or int(value) > U32_MAX:
                raise Err(HookError_BadConfig(f"`max_unread` = {pair.value!r}: expected an integer from 0 to {U32_MAX}"))
            settings["max_unread"] = int(value)
        elif pair.key == "hide_empty":
            if value not in ("true", "false"):
                raise Err(HookError_BadConfig(f"`hide_empty` = {pair.value!r}: expected true or false"))
            settings["hide_empty"] = value == "true"
    return settings


def archived_key(user_id: str) -> str:
    return f"archived:{user_id}"


def parse_archived(key: str, value: bytes | None) -> set:
    """The (channel type, channel id) pairs in the value of store key `key`;
    none when the key is absent. Anything but a JSON array of references is
    `Err(HookError_BadConfig)` naming the key."""
    if value is None:
        return set()
    try:
        entries = json.loads(value)
    except (ValueError, RecursionError) as e:  # ValueError includes UnicodeDecodeError
        raise Err(HookError_BadConfig(f"key-value key `{key}` is not JSON: {e}"))
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise Err(HookError_BadConfig(f"key-value key `{key}` must hold a JSON array of strings"))
    archived = set()
    for entry in entries:
        kind, sep, channel_id = entry.strip().partition(":")
        if not sep or kind not in KINDS or not channel_id:
            raise Err(HookError_BadConfig(f"key-value key `{key}`: {entry!r} is not person:<id> or group:<id>"))
        archived.add((KINDS[kind], channel_id))
    return archived


def verdict(settings: dict, archived: set, conversation: Conversation) -> Verdict:
    """What the viewer sees of one conversation. Drops come first: a dropped
    row needs no capped badge."""
    if (conversation.channel_type, conversation.channel_id) in archived:
        return Verdict_Drop()
    if settings["hide_empty"] and conversation.last_message is None:
        return Verdict_Drop()
    if conversation.unread > settings["max_unread"]:
        # Only the unread count changes: the channel id and type must stay.
        return Verdict_Rewrite(replace(conversation, unread=settings["max_unread"]))
    return Verdict_Keep()


def decide(settings: dict, archived: set, conversations: list[Conversation]) -> list[Verdict]:
    """One verdict per conversation, in order."""
    return [verdict(settings, archived, conversation) for conversation in conversations]


def kv_error_text(error) -> str:
    """`Storage: disk full` for `KvError_Storage("disk full")`."""
    kind = type(error).__name__.removeprefix("KvError_")
    return f"{kind}: {getattr(error, 'value', error)}"


def _unexpected(what: str, e: Exception) -> Err:
    return Err(HookError_Other(f"archive-filter: {what} failed: {type(e).__name__}: {e}"))


class Plugin(exports.Plugin):
    def init(self, config: list[Pair]) -> None:
        try:
            _settings.update(parse_settings(config))
            host.log(
                LogLevel.INFO,
                f"archive-filter ready: max_unread {_settings['max_unread']}, hide_empty {str(_settings['hide_empty']).lower()}",
                [
                    Pair("max_unread", str(_settings["max_unread"])),
                    Pair("hide_empty", str(_settings["hide_empty"]).lower()),
                ],
            )
        except Err:
            raise
        except Exception as e:
            raise _unexpected("init", e)


class ConversationFilter(exports.ConversationFilter):
    def filter(self, viewer: Viewer, conversations: list[Conversation]) -> list[Verdict]:
        try:
            key = archived_key(viewer.user_id)
            try:
                value = host.kv_get(key)
            except Err as e:
                # The host raises Err(KvError_...): answer with a hook-error,
                # not the kv-error, which is not what `filter` returns.
                raise Err(HookError_HostFailure(f"key-value store: reading `{key}`: {kv_error_text(e.value)}"))
            verdicts = decide(_settings, parse_archived(key, value), conversations)
            host.log(
                LogLevel.DEBUG,
                f"filtered {len(conversations)} conversations for {viewer.user_id}",
                [
                    Pair("viewer", viewer.user_id),
                    Pair("dropped", str(sum(isinstance(v, Verdict_Drop) for v in verdicts))),
                    Pair("rewritten", str(sum(isinstance(v, Verdict_Rewrite) for v in verdicts))),
                ],
            )
            return verdicts
        except Err:
            raise
        except Exception as e:
            raise _unexpected("filter", e)
