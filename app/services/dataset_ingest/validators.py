"""One validator per kind and format, and the detection of both from row 1.

A validator checks one row the way LLaMA-Factory's converter and processor will read it: what
would crash them is a fatal issue, what they silently drop or train badly on is a warning. It
returns the characters of the prompt and of what is trained on, and whether the row is trainable,
dropped, or neither (an empty answer); the RowBook does the rest.
"""

from __future__ import annotations

from typing import Any, Mapping

from app.services.dataset_ingest.formats import (
    DEFAULT_TAGS,
    OPENAI_TAGS,
    OPTIONAL_AUTO_NAMES,
    DatasetFormatError,
    column_roles,
    default_columns,
)
from app.services.dataset_ingest.stats import RowBook, describe

TRAINABLE, DROPPED, EMPTY = "trainable", "dropped", "empty"


class Validator:
    kind = "sft"
    formatting = "alpaca"

    def __init__(self, book: RowBook, columns: dict[str, str | None], tags: dict[str, str] | None) -> None:
        self.book = book
        self.columns = columns
        self.tags = tags
        self._issue = book.issue

    def __call__(self, obj: dict, row: int, row_chars: int) -> None:
        pchars, rchars, outcome = self.check(obj, row)
        book = self.book
        if outcome is TRAINABLE:
            book.trainable += 1
        elif outcome is DROPPED:
            book.dropped += 1
        book.common(obj, row, pchars, rchars)

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        raise NotImplementedError

    def _string(self, obj: dict, column: str | None, row: int) -> int:
        """An optional string column: its length (0 when absent)."""
        if not column:
            return 0
        value = obj.get(column)
        if value is None:
            return 0
        if type(value) is str:
            return len(value)
        self._issue(row, "bad_type", f"{column!r} is a {describe(value)}, expected a string")
        return 0

    def _tools(self, obj: dict, column: str | None, row: int) -> None:
        if column:
            value = obj.get(column)
            if value is not None and type(value) is not str:
                self._issue(row, "bad_tools", f"{column!r} is a {describe(value)}, expected a JSON string")


# ------------------------------------------------------------------------------------- alpaca
class AlpacaSft(Validator):
    def __init__(self, book: RowBook, columns: dict[str, str | None], tags: dict[str, str] | None) -> None:
        super().__init__(book, columns, tags)
        self._acols = tuple(columns.get(k) for k in ("prompt", "query", "response", "system", "history", "tools"))

    def _prompt(self, obj: dict, row: int) -> tuple[int, bool]:
        """Characters of instruction + input (the user's turn) and whether the instruction is missing."""
        pc, qc = self._acols[0], self._acols[1]
        prompt = obj.get(pc) if pc else None
        pchars = 0
        missing = False
        if type(prompt) is str and prompt:
            pchars = len(prompt)
        elif prompt is None or prompt == "":
            missing = True
        else:
            self._issue(row, "bad_type", f"{pc!r} is a {describe(prompt)}, expected a string")
        if qc:
            query = obj.get(qc)
            if type(query) is str:
                pchars += len(query)
            elif query is not None:
                self._issue(row, "bad_type", f"{qc!r} is a {describe(query)}, expected a string")
        return pchars, missing

    def _context(self, obj: dict, row: int) -> int:
        """Characters of the system prompt and the history; checks the tools."""
        _, _, _, sc, hc, tc = self._acols
        pchars = self._string(obj, sc, row)
        if hc:
            value = obj.get(hc)
            if value is not None:
                pchars += self._check_history(value, hc, row)
        self._tools(obj, tc, row)
        return pchars

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        rc = self._acols[2]
        issue = self._issue
        pchars, prompt_missing = self._prompt(obj, row)
        rchars = 0
        outcome = EMPTY
        resp = obj.get(rc) if rc else None
        if type(resp) is str:
            rchars = len(resp)
            if rchars:
                outcome = TRAINABLE
        elif resp is None:
            issue(row, "missing_output", f"{rc!r} is missing (LLaMA-Factory drops the row)")
            outcome = DROPPED
        else:
            issue(row, "bad_type", f"{rc!r} is a {describe(resp)}, expected a string")
        pchars += self._context(obj, row)
        if resp == "" and not pchars:
            issue(row, "nothing_to_train", "nothing to train on: the prompt and the response are empty")
        else:
            if prompt_missing:
                issue(row, "missing_instruction", f"{self._acols[0]!r} is missing or empty")
            if resp == "":
                issue(row, "empty_output", f"{rc!r} is empty")
        return pchars, rchars, outcome

    def _check_history(self, hist: Any, hc: str, row: int) -> int:
        if type(hist) is not list:
            self._issue(
                row, "bad_history", f"{hc!r} is a {describe(hist)}, expected a list of [prompt, response] pairs"
            )
            return 0
        total = 0
        for i, pair in enumerate(hist):
            if type(pair) is not list or len(pair) != 2:
                what = f"has {len(pair)} items" if type(pair) is list else f"is a {describe(pair)}"
                self._issue(row, "bad_history", f"{hc!r}[{i}] {what}, expected a [prompt, response] pair of strings")
                return total
            a, b = pair
            if type(a) is not str or type(b) is not str:
                self._issue(
                    row, "bad_history",
                    f"{hc!r}[{i}] holds {describe(a)}/{describe(b)}, expected two strings",
                )
                return total
            total += len(a) + len(b)
        return total


class AlpacaRanking(AlpacaSft):
    """instruction/input, then a `chosen` and a `rejected` answer: two strings."""

    kind = "ranking"

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        pchars, prompt_missing = self._prompt(obj, row)
        pchars += self._context(obj, row)
        rchars = 0
        outcome = TRAINABLE
        for role in ("chosen", "rejected"):
            column = self.columns[role]
            answer = obj.get(column)
            if type(answer) is str:
                rchars += len(answer)
                if not answer:
                    self._issue(row, "empty_output", f"{column!r} is empty")
            elif answer is None:
                self._issue(row, "missing_answer", f"{column!r} is missing (LLaMA-Factory drops the row)")
                outcome = DROPPED
            else:
                self._issue(row, "bad_type", f"{column!r} is a {describe(answer)}, expected a string")
        if prompt_missing:
            self._issue(row, "missing_instruction", f"{self._acols[0]!r} is missing or empty")
        return pchars, rchars, outcome


class Pretrain(Validator):
    """One document per row in the `text` column (LLaMA-Factory's alpaca `prompt`): all of it is
    trained on."""

    kind = "pretrain"

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        column = self.columns["prompt"]
        text = obj.get(column)
        if type(text) is str and text:
            return 0, len(text), TRAINABLE
        if text is None or type(text) is str:
            self._issue(row, "empty_text", f"{column!r} is empty: the row trains only the end-of-text token")
            return 0, len(text or ""), EMPTY
        self._issue(row, "bad_type", f"{column!r} is a {describe(text)}, expected a string")
        return 0, 0, EMPTY


# ------------------------------------------------------------------------------------ sharegpt
class SharegptSft(Validator):
    formatting = "sharegpt"
    # A conversation of SFT (and KTO) ends with the assistant's answer: an even number of turns.
    ends_with_answer = True

    def _messages(self, obj: dict, row: int) -> list[dict] | None:
        """The conversation, when every message is an object with a string role and content."""
        mc = self.columns["messages"]
        msgs = obj.get(mc)
        if msgs is None:
            self._issue(row, "missing_messages", f"{mc!r} is missing (LLaMA-Factory's converter fails on it)")
            return None
        if type(msgs) is not list:
            self._issue(row, "bad_messages", f"{mc!r} is a {describe(msgs)}, expected a list of messages")
            return None
        role_tag, content_tag = self.tags["role_tag"], self.tags["content_tag"]
        for i, m in enumerate(msgs):
            if type(m) is not dict:
                self._issue(row, "bad_message", f"{mc!r}[{i}] is a {describe(m)}, expected an object")
                return None
            r = m.get(role_tag)
            c = m.get(content_tag)
            if type(r) is not str or type(c) is not str:
                bad = role_tag if type(r) is not str else content_tag
                self._issue(row, "bad_message", f"{mc!r}[{i}].{bad} is {describe(m.get(bad))}, expected a string")
                return None
        return msgs

    def _turns(self, msgs: list[dict], row: int) -> tuple[int, bool]:
        """Checks the roles alternate; returns where the turns start (after a system message) and
        whether LLaMA-Factory drops the row."""
        tags = self.tags
        role_tag = tags["role_tag"]
        st = tags["system_tag"]
        start = 1 if st and msgs[0][role_tag] == st else 0
        odd = (tags["user_tag"], tags["observation_tag"])
        even = (tags["assistant_tag"], tags["function_tag"])
        known = set(odd) | set(even) | {st}
        accept = (odd, even)
        turns = 0
        for j in range(start, len(msgs)):
            r = msgs[j][role_tag]
            if r not in accept[turns % 2]:
                if r not in known:
                    self._issue(
                        row, "bad_role",
                        f"message {j + 1} has role {r!r}, not one of {sorted(x for x in known if x)}"
                        " (LLaMA-Factory drops the row)",
                    )
                else:
                    want = "/".join(accept[turns % 2])
                    self._issue(
                        row, "bad_alternation",
                        f"message {j + 1} has role {r!r} where {want} is expected (user/observation"
                        " and assistant/function_call must alternate; LLaMA-Factory drops the row)",
                    )
                return start, True
            turns += 1
        if turns % 2 != (0 if self.ends_with_answer else 1):
            if self.ends_with_answer:
                message = ("the conversation does not end with an assistant turn (odd number of turns;"
                           " LLaMA-Factory drops the row)")
            else:
                message = ("the conversation must end with the user's turn, which 'chosen' and 'rejected' answer"
                           " (an even number of turns here; LLaMA-Factory drops the row)")
            self._issue(row, "unpaired_turns", message)
            return start, True
        return start, False

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        cols = self.columns
        pchars = self._string(obj, cols["system"], row)
        self._tools(obj, cols["tools"], row)
        msgs = self._messages(obj, row)
        if msgs is None:
            return pchars, 0, EMPTY
        if not msgs:
            self._issue(row, "empty_conversation", f"{cols['messages']!r} is empty (LLaMA-Factory drops the row)")
            return pchars, 0, DROPPED
        role_tag, content_tag = self.tags["role_tag"], self.tags["content_tag"]
        start, dropped = self._turns(msgs, row)
        if start:
            pchars += len(msgs[0][content_tag])
        rchars = 0
        for j in range(start, len(msgs) - 1):
            pchars += len(msgs[j][content_tag])
        if len(msgs) > start:
            last = msgs[-1]
            if last[role_tag] in (self.tags["assistant_tag"], self.tags["function_tag"]):
                rchars = len(last[content_tag])
                if not dropped and rchars == 0:
                    if pchars:
                        self._issue(row, "empty_output", "the last assistant message is empty")
                    else:
                        self._issue(row, "nothing_to_train", "nothing to train on: every message is empty")
            else:
                pchars += len(last[content_tag])
        if dropped:
            return pchars, rchars, DROPPED
        return pchars, rchars, TRAINABLE if rchars else EMPTY


class SharegptRanking(SharegptSft):
    """A conversation ending with the user's turn, then `chosen` and `rejected`: one message each."""

    kind = "ranking"
    ends_with_answer = False

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        cols, tags = self.columns, self.tags
        pchars = self._string(obj, cols["system"], row)
        self._tools(obj, cols["tools"], row)
        msgs = self._messages(obj, row)
        outcome = TRAINABLE
        if msgs is None:
            outcome = EMPTY
        elif not msgs:
            self._issue(row, "empty_conversation", f"{cols['messages']!r} is empty (LLaMA-Factory drops the row)")
            outcome = DROPPED
        else:
            _, dropped = self._turns(msgs, row)
            pchars += sum(len(m[tags["content_tag"]]) for m in msgs)
            if dropped:
                outcome = DROPPED
        role_tag, content_tag = tags["role_tag"], tags["content_tag"]
        answers = (tags["assistant_tag"], tags["function_tag"])
        rchars = 0
        for role in ("chosen", "rejected"):
            column = cols[role]
            answer = obj.get(column)
            if answer is None:
                self._issue(row, "missing_answer", f"{column!r} is missing (LLaMA-Factory drops the row)")
                outcome = DROPPED
            elif type(answer) is not dict:
                self._issue(row, "bad_answer", f"{column!r} is a {describe(answer)}, expected a message object"
                                               f" with {role_tag!r} and {content_tag!r}")
                outcome = EMPTY
            elif type(answer.get(role_tag)) is not str or type(answer.get(content_tag)) is not str:
                bad = role_tag if type(answer.get(role_tag)) is not str else content_tag
                self._issue(row, "bad_answer", f"{column!r}.{bad} is {describe(answer.get(bad))}, expected a string")
                outcome = EMPTY
            elif answer[role_tag] not in answers:
                self._issue(row, "bad_answer", f"{column!r} has role {answer[role_tag]!r}; an answer is one of"
                                               f" {sorted(answers)}")
                outcome = EMPTY
            else:
                rchars += len(answer[content_tag])
                if not answer[content_tag]:
                    self._issue(row, "empty_output", f"{column!r} is empty")
        return pchars, rchars, outcome


class _KtoTag:
    """A KTO row is an SFT row whose answer carries a true/false `kto_tag` (desirable or not)."""

    kind = "kto"

    def check(self, obj: dict, row: int) -> tuple[int, int, str]:
        pchars, rchars, outcome = super().check(obj, row)  # type: ignore[misc]
        column = self.columns["kto_tag"]
        tag = obj.get(column)
        if tag is None:
            self._issue(row, "missing_kto_tag", f"{column!r} is missing (LLaMA-Factory drops the row)")
            outcome = DROPPED
        elif type(tag) is not bool:
            self._issue(row, "bad_kto_tag", f"{column!r} is a {describe(tag)}, expected true or false")
            outcome = EMPTY
        return pchars, rchars, outcome


class AlpacaKto(_KtoTag, AlpacaSft):
    pass


class SharegptKto(_KtoTag, SharegptSft):
    pass


VALIDATORS: dict[tuple[str, str], type[Validator]] = {
    ("sft", "alpaca"): AlpacaSft,
    ("sft", "sharegpt"): SharegptSft,
    ("ranking", "alpaca"): AlpacaRanking,
    ("ranking", "sharegpt"): SharegptRanking,
    ("kto", "alpaca"): AlpacaKto,
    ("kto", "sharegpt"): SharegptKto,
    ("pretrain", "alpaca"): Pretrain,
}


# ------------------------------------------------------------------------------------ detection
def _kto_key(obj: dict) -> str | None:
    """LLaMA-Factory's kto_en_demo keeps the tag in a boolean "label" next to the messages."""
    if "kto_tag" in obj:
        return "kto_tag"
    conversation = "messages" in obj or "conversations" in obj
    return "label" if conversation and type(obj.get("label")) is bool else None


def _detect_kind(obj: dict, kind: str, user_columns: Mapping[str, str | None], byte_offset: int) -> str:
    mapped = {key for key in user_columns.values() if key}
    pairwise = {"chosen", "rejected"} <= obj.keys() and not {"chosen", "rejected"} & mapped
    tag = _kto_key(obj)
    tag = tag if tag is not None and tag not in mapped else None
    if kind == "sft":  # asked for SFT: a preference file read as SFT loses its answers, so say what it is
        if pairwise:
            raise DatasetFormatError(
                "row 1 has 'chosen' and 'rejected': this is a preference (ranking) dataset for DPO/ORPO-style"
                " training, not SFT (an 'output', or a conversation ending with the assistant's answer); upload it"
                " with kind 'ranking', or let the kind be detected",
                byte_offset=byte_offset, row=1,
            )
        if tag is not None:
            raise DatasetFormatError(
                f"row 1 has a true/false {tag!r}: this is a KTO dataset (answers marked desirable or not), not SFT;"
                " upload it with kind 'kto', or let the kind be detected",
                byte_offset=byte_offset, row=1,
            )
        return kind
    if kind != "auto":
        return kind
    if {"chosen", "rejected"} & set(user_columns) or pairwise:
        return "ranking"
    if "kto_tag" in user_columns or tag is not None:
        return "kto"
    sft_keys = {"instruction", "output", "conversations", "messages"}
    if "text" in obj and not sft_keys & obj.keys() and not set(user_columns) - {"prompt"}:
        return "pretrain"
    return "sft"


def _detect_formatting(obj: dict, kind: str, formatting: str, uc: Mapping[str, str | None], byte_offset: int) -> str:
    if kind == "pretrain":
        if formatting == "sharegpt":
            raise DatasetFormatError("pre-training text has no conversations: its formatting is alpaca ('text')",
                                     byte_offset=byte_offset, row=1)
        return "alpaca"
    if formatting != "auto":
        return formatting
    if "messages" in uc:
        return "sharegpt"
    if any(k in uc for k in ("prompt", "query", "response", "history")):
        return "alpaca"
    if ("conversations" in obj or "messages" in obj) and not ("instruction" in obj or "output" in obj):
        return "sharegpt"
    if "instruction" in obj or "output" in obj or kind != "sft":
        return "alpaca"
    hint = ""
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            hint = (
                f" Key {k!r} holds a list of objects: if the file is one object wrapping the rows,"
                " LLaMA-Factory needs the rows themselves as a top-level JSON array."
            )
            break
    raise DatasetFormatError(
        f"cannot detect the dataset format from row 1 (keys: {[k[:40] for k in sorted(obj)[:20]]}):"
        " expected alpaca"
        " (instruction/input/output) or sharegpt (conversations or messages). Pass formatting= and"
        " columns= to map other key names." + hint,
        byte_offset=byte_offset,
        row=1,
    )


def detect(
    obj: dict, byte_offset: int, *, book: RowBook, kind: str, formatting: str,
    user_columns: Mapping[str, str | None], user_tags: Mapping[str, str],
) -> Validator:
    """The validator for a file whose row 1 is `obj`, given what its uploader said (or "auto")."""
    uc = dict(user_columns)
    kind = _detect_kind(obj, kind, uc, byte_offset)
    fmt = _detect_formatting(obj, kind, formatting, uc, byte_offset)
    bad = set(uc) - column_roles(kind, fmt)
    if bad:
        raise ValueError(f"columns {sorted(bad)} are not valid for the {fmt} format")
    cols = default_columns(kind, fmt)
    if kind == "kto" and "kto_tag" not in uc:
        cols["kto_tag"] = _kto_key(obj) or "kto_tag"
    tags = None
    if fmt == "alpaca":
        if kind != "pretrain":
            cols.update(OPTIONAL_AUTO_NAMES)
    else:
        cols["system"] = "system"
        cols["tools"] = "tools"
        if "messages" not in uc and "conversations" not in obj and "messages" in obj:
            cols["messages"] = "messages"
    cols.update(uc)
    if kind == "ranking" and not all(cols[role] and cols[role] in obj for role in ("chosen", "rejected")):
        raise DatasetFormatError(
            f"row 1 has no {cols['chosen']!r} and {cols['rejected']!r}: a preference (ranking) row holds a chosen and"
            " a rejected answer (map other key names with columns=)",
            byte_offset=byte_offset, row=1,
        )
    if kind == "pretrain" and cols["prompt"] not in obj:
        raise DatasetFormatError(
            f"row 1 has no {cols['prompt']!r}: a pre-training row holds its document in 'text' (map another key"
            " with columns={\"prompt\": ...})",
            byte_offset=byte_offset, row=1,
        )
    if fmt == "sharegpt":
        base = DEFAULT_TAGS
        if not {"role_tag", "content_tag"} <= set(user_tags):
            msgs = obj.get(cols["messages"])
            first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else None
            if first is not None:
                if "role" in first and "from" not in first:
                    base = OPENAI_TAGS
            elif cols["messages"] == "messages":
                base = OPENAI_TAGS
        tags = dict(base)
        tags.update(user_tags)
    return VALIDATORS[(kind, fmt)](book, cols, tags)
