"""OpenAssistant OASST1 / OASST2 message trees.

Accepts the three published shapes (detected per record): the trees JSONL (one tree per line,
nested ``replies``), the flat messages JSONL (``parent_id`` links; trees are rebuilt across all
inputs), and the HF Parquet rows (flat messages; ``emojis``/``labels`` as dict-of-lists, kept
verbatim). Roles map ``prompter`` -> user, ``assistant`` -> assistant.

* Rankings: every message with two or more *ranked* assistant replies yields a ranking: prompt =
  the conversation from the root to that message, completions = the ranked replies (one
  assistant message each), ranks = their ``rank`` order (0 = best; gaps closed; the rank is
  already a consensus of several rankers). Unranked siblings stay out (``meta.unranked_replies``);
  ranked *prompter* replies are not assistant preferences and are skipped (counted in the notes).
* SFT (``--sft``): ``best`` (default) follows at each message the best-ranked reply (all replies
  when none is ranked) and emits every distinct root-to-assistant conversation that ends a
  thread (a trailing prompter turn is trimmed); ``all`` does so without pruning; ``none`` skips.
* Filters: ``--tree-state`` (default ``ready_for_export``; ``any``) and ``--lang`` drop whole trees;
  deleted messages and those failing review (``review_result: false``) are dropped with their
  replies. All counted.

Per-message fields other than text/role/replies stay in ``meta`` (``per_completion`` for a
ranking's replies, ``per_turn`` for an SFT conversation); tree fields in ``meta.tree``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data_tools.base import Dropped, Item, Source, dense_ranks, get, msg, require_object, without
from data_tools.canonical import RecordError

ROLES = {"prompter": "user", "assistant": "assistant"}
TREE_FIELDS = ("message_tree_id", "tree_state")


@dataclass
class Node:
    m: dict
    children: list = field(default_factory=list)


def check_message(m, where: str, prefix: str) -> dict:
    if not isinstance(m, dict):
        raise RecordError(where, prefix.rstrip(".") or None, "a message must be an object")
    get(m, "message_id", where, prefix=prefix)
    get(m, "text", where, prefix=prefix)
    role = get(m, "role", where, prefix=prefix)
    if role not in ROLES:
        raise RecordError(where, prefix + "role", f"must be 'prompter' or 'assistant', not {role!r}")
    rank = m.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise RecordError(where, prefix + "rank", f"must be an integer >= 0 or null, not {rank!r}")
    if m.get("parent_id") is not None and not isinstance(m["parent_id"], str):
        raise RecordError(where, prefix + "parent_id", "must be a string or null")
    return m


def removed_reason(m: dict) -> str | None:
    if m.get("deleted") is True:
        return "deleted message (with its replies)"
    if m.get("review_result") is False:
        return "message failed review, review_result false (with its replies)"
    return None


def tree_filter(tree_state, lang, opts) -> None:
    if opts.tree_state != "any" and tree_state is not None and tree_state != opts.tree_state:
        raise Dropped(f"tree_state is not {opts.tree_state}")
    if opts.lang and lang not in opts.lang.split(","):
        raise Dropped(f"language not in --lang {opts.lang}")


def _meta(m: dict) -> dict:
    return without(m, "text", "role", "replies", *TREE_FIELDS)


def tree_records(root: Node, tree: dict, opts, notes: dict) -> list[dict]:
    out = []

    def turns(path):
        return [msg(ROLES[n.m["role"]], n.m["text"]) for n in path]

    def walk(path):
        node = path[-1]
        ranked = [c for c in node.children if c.m.get("rank") is not None]
        assistants = [c for c in ranked if c.m["role"] == "assistant"]
        if len(ranked) >= 2 and len(assistants) < len(ranked):
            notes["rankings of prompter replies skipped"] = notes.get("rankings of prompter replies skipped", 0) + 1
        if len(assistants) >= 2:
            meta = {"tree": tree, "prompt_message_ids": [n.m["message_id"] for n in path],
                    "per_completion": [_meta(c.m) for c in assistants]}
            unranked = [c.m["message_id"] for c in node.children if c.m.get("rank") is None]
            if unranked:
                meta["unranked_replies"] = unranked
            out.append({"prompt": turns(path), "completions": [[msg("assistant", c.m["text"])] for c in assistants],
                        "ranks": dense_ranks([c.m["rank"] for c in assistants], higher_is_better=False),
                        "meta": meta})
        for c in node.children:
            walk(path + [c])

    walk([root])
    if opts.sft == "none":
        return out
    ends: dict[int, list] = {}

    def threads(path):
        node = path[-1]
        kids = node.children
        if opts.sft == "best" and any(c.m.get("rank") is not None for c in kids):
            best = min(c.m["rank"] for c in kids if c.m.get("rank") is not None)
            kids = [c for c in kids if c.m.get("rank") == best]
        if not kids:
            last = max((i for i, n in enumerate(path) if n.m["role"] == "assistant"), default=None)
            if last is not None:
                ends.setdefault(id(path[last]), path[:last + 1])
        for c in kids:
            threads(path + [c])

    threads([root])
    for path in ends.values():
        out.append({"messages": turns(path), "meta": {"tree": tree, "per_turn": [_meta(n.m) for n in path]}})
    return out


class OASST(Source):
    def add_arguments(self, parser):
        parser.add_argument("--sft", choices=("best", "all", "none"), default="best",
                            help="SFT conversations: along best-ranked replies (default), all threads, or none")
        parser.add_argument("--tree-state", default="ready_for_export",
                            help="keep trees in this state (default ready_for_export; 'any' keeps all)")
        parser.add_argument("--lang", help="keep trees whose root message has one of these languages, e.g. en,de")

    def convert(self, item, opts, state):
        raw = require_object(item.raw, item.where)
        where = item.where
        notes = state.setdefault("notes", {})
        if isinstance(raw.get("prompt"), dict):                      # a trees-file line
            tree = without(raw, "prompt")
            tree_filter(raw.get("tree_state"), raw["prompt"].get("lang"), opts)

            def build(m, prefix):
                check_message(m, where, prefix)
                replies = m.get("replies") or []
                if not isinstance(replies, list):
                    raise RecordError(where, prefix + "replies", "must be a list")
                node = Node(m)
                for i, r in enumerate(replies):
                    child = build(r, f"{prefix}replies[{i}].")
                    if child is not None:
                        node.children.append(child)
                reason = removed_reason(m)
                if reason:
                    notes[f"pruned from trees: {reason}"] = notes.get(f"pruned from trees: {reason}", 0) + 1
                    return None
                return node

            root = build(raw["prompt"], "prompt.")
            if root is None:
                raise Dropped("the tree's root message is deleted or failed review")
            if root.m["role"] != "prompter":
                raise RecordError(where, "prompt.role", "a tree's root must be a prompter message")
            return tree_records(root, tree, opts, notes)
        if "message_id" in raw:                                       # a flat message (JSONL or Parquet row)
            check_message(raw, where, "")
            state.setdefault("messages", []).append(item)
            return []
        raise RecordError(where, None, "neither a message (message_id) nor a tree line (prompt with replies)")

    def finish(self, opts, state):
        items: list[Item] = state.get("messages", [])
        by_id: dict[str, Item] = {}
        for it in items:
            mid = it.raw["message_id"]
            if mid in by_id:
                yield "reject", it, RecordError(it.where, "message_id", f"duplicate message_id {mid} "
                                                                        f"(first at {by_id[mid].where})")
                continue
            by_id[mid] = it
        children: dict[str, list[Item]] = {}
        roots = []
        for it in by_id.values():
            pid = it.raw.get("parent_id")
            if pid is None:
                roots.append(it)
            elif pid not in by_id:
                yield "reject", it, RecordError(it.where, "parent_id", f"parent message {pid} is not in the input")
            else:
                children.setdefault(pid, []).append(it)
        reached = set()

        def build(it, events):
            reached.add(it.raw["message_id"])
            node = Node(it.raw)
            for c in children.get(it.raw["message_id"], []):
                reason = removed_reason(c.raw)
                if reason:
                    events.extend(("drop", d, reason) for d in subtree(c))
                    continue
                node.children.append(build(c, events))
            return node

        def subtree(it):
            reached.add(it.raw["message_id"])
            yield it
            for c in children.get(it.raw["message_id"], []):
                yield from subtree(c)

        for r in roots:
            events: list = []
            m = r.raw
            try:
                if removed_reason(m):
                    raise Dropped(removed_reason(m))
                tree_filter(m.get("tree_state"), m.get("lang"), opts)
            except Dropped as d:
                yield from (("drop", x, d.reason) for x in subtree(r))
                continue
            if m["role"] != "prompter":
                err = RecordError(r.where, "role", "a tree's root (parent_id null) must be a prompter message")
                yield from (("reject", x, err) for x in subtree(r))
                continue
            root = build(r, events)
            yield from events
            tree = {k: m[k] for k in TREE_FIELDS if k in m}
            yield "records", r, tree_records(root, tree, opts, state.setdefault("notes", {}))
        for it in by_id.values():        # in a cycle, or below a rejected parent
            if it.raw["message_id"] not in reached and it.raw.get("parent_id") in by_id:
                yield "reject", it, RecordError(it.where, "parent_id", "does not lead to a root message")


SOURCE = OASST("oasst", "OpenAssistant OASST1/OASST2 trees, flat messages or HF Parquet rows -> rankings + SFT")

if __name__ == "__main__":
    from data_tools.cli import module_main
    module_main(SOURCE.name)
