"""The native Recommend fast path's hand-written protobuf bytes agree with the generated descriptor.

``KnownUserRecommender`` in ``recsys/csrc/hnsw_ext.cpp`` parses a serialized ``RecommendRequest`` and writes the
serialized ``RecommendResponse`` itself, with field numbers and wire types as inline literals (``field == 3``,
``push_back('\\x12')``) -- there are no named constants to import. So each site is found here by a regex anchored
on the *code* around it (the variable it fills, the value it writes), the numbers are read out of the source, and
those are checked against ``recsys.v1.recommender_pb2``. A renumbered or retyped field in the .proto, or an edited
literal in the C++, fails here instead of silently sending requests down the wrong branch (the load-time
byte-for-byte check in ``server.fastpath`` only compares the requests it happens to try).

The enum values are not hard-coded in C++: ``server/fastpath.py`` passes ``pb.SOURCE_*`` by name (checked below);
the C++ only relies on 0 being the default that proto3 leaves out.

The checks are functions of (C++ text, file descriptor), so the tests at the bottom feed them mutated copies of
either and show they fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as FD

from recsys.v1 import recommender_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "recsys" / "csrc" / "hnsw_ext.cpp"
FASTPATH = ROOT / "server" / "fastpath.py"

# The wire type each descriptor type is encoded with (a non-packed field).
WIRE = {
    **dict.fromkeys((FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32, FD.TYPE_SINT64,
                     FD.TYPE_BOOL, FD.TYPE_ENUM), 0),
    **dict.fromkeys((FD.TYPE_FIXED64, FD.TYPE_SFIXED64, FD.TYPE_DOUBLE), 1),
    **dict.fromkeys((FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE), 2),
    **dict.fromkeys((FD.TYPE_FIXED32, FD.TYPE_SFIXED32, FD.TYPE_FLOAT), 5),
}


@dataclass(frozen=True)
class Site:
    """One hand-encoded field in the C++: ``pattern`` must match the fast-path section exactly once and capture
    either ``tag`` (a '\\xNN' key byte) or ``field`` and ``wire`` (the parser's comparisons)."""

    name: str
    message: str
    field: str
    type: int  # the descriptor type the C++ code's decoding / encoding assumes
    repeated: bool  # the C++ code reads / writes it as a repeated field
    pattern: str


LIT = r"'\\x(?P<tag>[0-9a-fA-F]{2})'"
SITES = [
    # --- RecommendRequest, parsed in KnownUserRecommender::answer ---
    Site("request user_id", "RecommendRequest", "user_id", FD.TYPE_STRING, False,
         r"if \(field == (?P<field>\d+) && wire == (?P<wire>\d+)\) \{[^{}]*?\buser = std::string_view"),
    Site("request history_item_ids", "RecommendRequest", "history_item_ids", FD.TYPE_STRING, True,
         r"if \(field == (?P<field>\d+) && wire == (?P<wire>\d+)\) \{[^{}]*?\bevents\.push_back"),
    Site("request k", "RecommendRequest", "k", FD.TYPE_INT32, False,  # plain varint, low 32 bits
         r"if \(field == (?P<field>\d+)\) k = int64_t\(int32_t\("),
    Site("request include_seen", "RecommendRequest", "include_seen", FD.TYPE_BOOL, False,
         r"if \(field == (?P<field>\d+)\) include_seen = v != 0"),
    # filter: skipped when the caller (server/fastpath.recommend_filtered) passes the set it compiled from it
    Site("request filter", "RecommendRequest", "filter", FD.TYPE_MESSAGE, False,
         r"if \(field == (?P<field>\d+) && wire == (?P<wire>\d+) && allow\) \{\s*// filter"),
    # allow_fallback is accepted and ignored: read with k and include_seen in the varint branch, its number is
    # the one that branch accepts besides theirs (VARINT_BRANCH below); the comment is only a cross-check
    Site("request allow_fallback (comment)", "RecommendRequest", "allow_fallback", FD.TYPE_BOOL, False,
         r"// field (?P<field>\d+), allow_fallback"),
    # --- RecommendResponse / ScoredItem, written by the constructor and answer ---
    Site("ScoredItem.item_id", "ScoredItem", "item_id", FD.TYPE_STRING, False,
         rf"f\.push_back\({LIT}\);\s*write_varint\(f, id\.size\(\)\);\s*f \+= id;"),
    Site("RecommendResponse.model_version", "RecommendResponse", "model_version", FD.TYPE_STRING, False,
         rf"tail_\.push_back\({LIT}\);\s*write_varint\(tail_, model_version\.size\(\)\);"),
    Site("RecommendResponse.source (known user)", "RecommendResponse", "source", FD.TYPE_ENUM, False,
         rf"tail_\.push_back\({LIT}\);\s*write_varint\(tail_, uint64_t\(int64_t\(source\)\)\);"),
    Site("RecommendResponse.source (events / history)", "RecommendResponse", "source", FD.TYPE_ENUM,
         False, rf"tail->push_back\({LIT}\);\s*write_varint\(\*tail, uint64_t\(int64_t\(src\)\)\);"),
    Site("RecommendResponse.items", "RecommendResponse", "items", FD.TYPE_MESSAGE, True,
         rf"out\.push_back\({LIT}\);[^\n]*\n\s*write_varint\(out, f\.size\(\) \+ \(bits \? 5 : 0\)\);"),
    Site("ScoredItem.score", "ScoredItem", "score", FD.TYPE_FLOAT, False,  # fixed32, 4 bytes
         rf"out\.push_back\({LIT}\);\s*for \(int b = 0; b < 4; b\+\+\) out\.push_back"),
]

# The varint branch of the request parser: ``(field == a || field == b || field == c) && wire == w``.
VARINT_BRANCH = r"\(field == (\d+) \|\| field == (\d+) \|\| field == (\d+)\) && wire == (\d+)\)"


def fast_path_section(cpp: str) -> str:
    """The text of ``class KnownUserRecommender`` (the only hand-written protobuf in the file)."""
    start = cpp.find("class KnownUserRecommender")
    assert start >= 0, "class KnownUserRecommender not found in the C++ source"
    end = cpp.find("PYBIND11_MODULE", start)
    return cpp[start:end if end > 0 else len(cpp)]


def line_of(cpp: str, section_start: int, pos: int) -> int:
    return cpp.count("\n", 0, section_start + pos) + 1


def extract(cpp: str) -> tuple[dict[str, tuple[int, int | None, int]], list[str]]:
    """``{site name: (field number, wire type or None, line)}`` read from the C++ source, and the problems met
    (a site matched zero or several times, a hand-written key byte or field comparison no site accounts for)."""
    section = fast_path_section(cpp)
    base = cpp.find(section)
    found: dict[str, tuple[int, int | None, int]] = {}
    problems: list[str] = []
    claimed_tags: set[int] = set()
    for s in SITES:
        hits = list(re.finditer(s.pattern, section))
        if len(hits) != 1:
            problems.append(f"{s.name}: {len(hits)} matches for its C++ pattern (want exactly 1); "
                            "the C++ changed shape -- update SITES in this test")
            continue
        m = hits[0]
        line = line_of(cpp, base, m.start())
        if "tag" in m.groupdict() and m.group("tag") is not None:
            key = int(m.group("tag"), 16)
            found[s.name] = (key >> 3, key & 7, line)
            claimed_tags.add(base + m.start("tag"))
        else:
            wire = m.groupdict().get("wire")
            found[s.name] = (int(m.group("field")), None if wire is None else int(wire), line)
    # The varint branch: which numbers it accepts with which wire type; the one that is neither k nor
    # include_seen is allow_fallback.
    branch = list(re.finditer(VARINT_BRANCH, section))
    if len(branch) != 1:
        problems.append(f"varint branch: {len(branch)} matches (want 1)")
    else:
        *nums, wire = (int(g) for g in branch[0].groups())
        line = line_of(cpp, base, branch[0].start())
        found["varint branch"] = (-1, wire, line)
        named = {found[n][0] for n in ("request k", "request include_seen") if n in found}
        rest = [n for n in nums if n not in named]
        if len(rest) != 1 or len(named) != 2 or not named <= set(nums):
            problems.append(f"varint branch accepts {nums}, k / include_seen are {sorted(named)}")
        else:
            found["request allow_fallback"] = (rest[0], wire, line)
            for n in ("request k", "request include_seen"):
                if n in found:
                    found[n] = (found[n][0], wire, found[n][2])
            said = found.get("request allow_fallback (comment)")
            if said is not None and said[0] != rest[0]:
                problems.append(f"line {said[2]}: the comment says allow_fallback is field {said[0]}, the varint "
                                f"branch accepts {rest[0]}")
    # Completeness: every key byte written and every field number compared in the section belongs to a site.
    for m in re.finditer(r"push_back\('\\x([0-9a-fA-F]{2})'\)", section):
        if base + m.start(1) not in claimed_tags:
            problems.append(f"line {line_of(cpp, base, m.start())}: hand-written key byte 0x{m.group(1)} "
                            "that no site in this test checks")
    known = {v[0] for k, v in found.items() if k.startswith("request")}
    for m in re.finditer(r"\bfield == (\d+)", section):
        if int(m.group(1)) not in known:
            problems.append(f"line {line_of(cpp, base, m.start())}: field == {m.group(1)} is not a checked "
                            "RecommendRequest field")
    return found, problems


def _repeated(f) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED  # protobuf < 5.29


def check(cpp: str, file_desc) -> list[str]:
    """Every problem with the C++ fast path's field numbers / wire types against ``file_desc``."""
    found, problems = extract(cpp)
    msgs = file_desc.message_types_by_name
    for s in SITES:
        name = s.name.replace(" (comment)", "")
        if name not in found:
            continue
        number, wire, line = found[name]
        try:
            f = msgs[s.message].fields_by_name[s.field]
        except KeyError:
            problems.append(f"{s.name}: {s.message}.{s.field} is not in the descriptor")
            continue
        where = f"{CPP.name}:{line} ({name})"
        if number != f.number:
            problems.append(f"{where}: C++ uses field {number}, {s.message}.{s.field} is {f.number}")
        if f.type != s.type:
            problems.append(f"{where}: the C++ code handles type {s.type}, {s.message}.{s.field} is type {f.type}")
        if _repeated(f) != s.repeated:
            problems.append(f"{where}: the C++ code assumes repeated={s.repeated}, {s.message}.{s.field} is "
                            f"repeated={_repeated(f)}")
        if wire is not None and wire != WIRE.get(f.type):
            problems.append(f"{where}: C++ uses wire type {wire}, {s.message}.{s.field} is encoded with "
                            f"{WIRE.get(f.type)}")
    if not problems:
        req, resp, item = (msgs[n].fields_by_name for n in ("RecommendRequest", "RecommendResponse", "ScoredItem"))
        if resp["items"].message_type.full_name != msgs["ScoredItem"].full_name:
            problems.append("RecommendResponse.items is no longer a list of ScoredItem")
        if resp["source"].enum_type.full_name != file_desc.enum_types_by_name["Source"].full_name:
            problems.append("RecommendResponse.source is no longer the Source enum")
        # The C++ writes items, then model_version, then source, and item_id before score: byte-identical to the
        # Python serializer only while that is field-number order (fallback, never written, sits in between).
        order = [resp[n].number for n in ("items", "model_version", "fallback", "source")]
        if order != sorted(order):
            problems.append(f"RecommendResponse items/model_version/fallback/source numbers {order} not ascending")
        if not item["item_id"].number < item["score"].number:
            problems.append("ScoredItem.item_id must come before score (the C++ writes them in that order)")
        if resp["fallback"].type != FD.TYPE_BOOL:
            problems.append("RecommendResponse.fallback: the C++ leaves it out as false, it must stay a bool")
    return problems


def test_cpp_fast_path_fields_match_the_descriptor():
    problems = check(CPP.read_text(), pb.DESCRIPTOR)
    assert problems == [], "\n".join(problems)


def test_every_site_is_found_once_and_covers_the_hand_encoded_fields():
    found, problems = extract(CPP.read_text())
    assert problems == []
    # every field the fast path reads or writes, by name
    assert set(found) == {s.name for s in SITES} | {"request allow_fallback", "varint branch"}


def test_source_enum_values_are_passed_by_name_not_hard_coded():
    # The C++ writes whatever `source` / `events_source` / `history_source` it is built with, leaving out 0
    # (`if (source != 0)`): the proto3 default, which must be SOURCE_UNSPECIFIED.
    assert pb.Source.Value("SOURCE_UNSPECIFIED") == 0
    assert "if (source != 0)" in CPP.read_text() and "if (src != 0)" in CPP.read_text()
    tree = ast.parse(FASTPATH.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "KnownUserRecommender"]
    assert len(calls) == 1
    sources = []
    for node in ast.walk(tree):  # source positional arg (9th) and the events/history_source dict entries
        if isinstance(node, ast.Attribute) and node.attr.startswith("SOURCE_"):
            sources.append(node.attr)
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value in ("events_source", "history_source"):
                    assert not isinstance(v, ast.Constant), f"{k.value} is a literal in fastpath.py"
    assert not isinstance(calls[0].args[8], ast.Constant)
    assert ast.unparse(calls[0].args[8]) == "int(pb.SOURCE_KNOWN_USER)"
    assert set(sources) == {"SOURCE_KNOWN_USER", "SOURCE_KNOWN_USER_WITH_EVENTS", "SOURCE_HISTORY"}
    for name in sources:
        assert name in pb.Source.keys()


# --- the checks fail on a wrong number -------------------------------------------------------------------------

CPP_MUTATIONS = {
    "user_id renumbered": ("if (field == 1 && wire == 2) {", "if (field == 5 && wire == 2) {"),
    "user_id wire type": ("if (field == 1 && wire == 2) {", "if (field == 1 && wire == 0) {"),
    "history renumbered": ("} else if (field == 2 && wire == 2) {", "} else if (field == 6 && wire == 2) {"),
    "k renumbered": ("if (field == 3) k =", "if (field == 7) k ="),
    "varint branch": ("(field == 3 || field == 4 || field == 7) && wire == 0)",
                      "(field == 3 || field == 4 || field == 6) && wire == 0)"),
    "varint wire type": ("(field == 3 || field == 4 || field == 7) && wire == 0)",
                         "(field == 3 || field == 4 || field == 7) && wire == 5)"),
    "item_id tag": ("f.push_back('\\x0a');", "f.push_back('\\x12');"),
    "model_version tag": ("tail_.push_back('\\x12');", "tail_.push_back('\\x1a');"),
    "source tag": ("tail_.push_back('\\x20');", "tail_.push_back('\\x18');"),
    "events source tag": ("tail->push_back('\\x20');", "tail->push_back('\\x22');"),
    "items tag": ("out.push_back('\\x0a');  // RecommendResponse.items", "out.push_back('\\x0b');  // x"),
    "score tag": ("out.push_back('\\x15');", "out.push_back('\\x11');"),
    "new unchecked key byte": ("out += *tail;", "out.push_back('\\x28'); out += *tail;"),
    "new unchecked field": ("} else {\n                return false;  // lists",
                            "} else if (field == 9) {\n            } else {\n                return false;  // lists"),
    "site reshaped": ("write_varint(tail_, model_version.size());", "write_varint(tail_, model_version.length());"),
}


@pytest.mark.parametrize("name", sorted(CPP_MUTATIONS))
def test_a_wrong_number_in_the_cpp_fails(name):
    old, new = CPP_MUTATIONS[name]
    cpp = CPP.read_text()
    assert cpp.count(old) == 1, f"mutation {name!r} no longer applies to the C++ source"
    problems = check(cpp.replace(old, new), pb.DESCRIPTOR)
    assert problems, f"mutation {name!r} went unnoticed"


def _mutated_descriptor(edit):
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    edit({m.name: {f.name: f for f in m.field} for m in proto.message_type})
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool.FindFileByName(proto.name)


PROTO_MUTATIONS = {
    "k renumbered": lambda m: setattr(m["RecommendRequest"]["k"], "number", 10),
    "k made sint32": lambda m: setattr(m["RecommendRequest"]["k"], "type", FD.TYPE_SINT32),
    "allow_fallback renumbered": lambda m: setattr(m["RecommendRequest"]["allow_fallback"], "number", 9),
    "include_seen made int32": lambda m: setattr(m["RecommendRequest"]["include_seen"], "type", FD.TYPE_INT32),
    "model_version renumbered": lambda m: setattr(m["RecommendResponse"]["model_version"], "number", 6),
    "source renumbered": lambda m: setattr(m["RecommendResponse"]["source"], "number", 7),
    "score made double": lambda m: setattr(m["ScoredItem"]["score"], "type", FD.TYPE_DOUBLE),
    "item_id renumbered": lambda m: setattr(m["ScoredItem"]["item_id"], "number", 3),
    "user_id made repeated": lambda m: setattr(m["RecommendRequest"]["user_id"], "label", FD.LABEL_REPEATED),
    "items renumbered": lambda m: setattr(m["RecommendResponse"]["items"], "number", 9),
}


def test_the_unmutated_descriptor_copy_passes():
    assert check(CPP.read_text(), _mutated_descriptor(lambda m: None)) == []


@pytest.mark.parametrize("name", sorted(PROTO_MUTATIONS))
def test_a_changed_proto_fails(name):
    problems = check(CPP.read_text(), _mutated_descriptor(PROTO_MUTATIONS[name]))
    assert problems, f"proto change {name!r} went unnoticed"
