"""Referring expressions for synthetic scenes, each checked to pick exactly one object.

An expression is a head description (colour and/or shape, optionally a size word;
objects are drawn either small or large, from separated ranges), optionally followed by an absolute location ("on the left", "at the top") or a
relation to a uniquely described anchor object ("below the green star"). Every
expression is evaluated against the whole scene and kept only when exactly one object
satisfies it with a clear margin; borderline cases are discarded, not guessed.
"""
from typing import List, NamedTuple, Optional, Tuple

LOCATION_MARGIN = 0.12      # "on the left": centre gap to the next candidate, fraction of the image side
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
LOCATIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


class Obj(NamedTuple):
    shape: str
    colour: str
    size: str                                  # "small" / "large" (drawn from separated size ranges)
    box: Tuple[float, float, float, float]     # x0, y0, x1, y1

    @property
    def centre(self):
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


class Desc(NamedTuple):
    colour: Optional[str]
    shape: Optional[str]
    size: Optional[str] = None

    def text(self) -> str:
        words = [w for w in (self.size, self.colour, self.shape or "object") if w]
        return "the " + " ".join(words)


def _matches(objs, desc: Desc) -> List[int]:
    return [i for i, o in enumerate(objs)
            if desc.colour in (None, o.colour) and desc.shape in (None, o.shape) and desc.size in (None, o.size)]


def _location_pick(objs, cand, where: str, *, side: float) -> Optional[int]:
    """The candidate extreme in direction ``where`` when it leads the next one by the margin."""
    axis, sign = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}[where]
    if not cand:
        return None
    keyed = sorted(cand, key=lambda i: sign * objs[i].centre[axis], reverse=True)
    if len(keyed) > 1 and abs(objs[keyed[0]].centre[axis] - objs[keyed[1]].centre[axis]) < LOCATION_MARGIN * side:
        return None
    return keyed[0]


def _relation(a: Obj, b: Obj, rel: str) -> Optional[bool]:
    """True when a lies fully beyond b's edge, False when a's centre is on b's side, None in between."""
    ax, ay = a.centre
    bx, by = b.centre
    if rel == "below":
        return True if a.box[1] >= b.box[3] else (False if ay <= by else None)
    if rel == "above":
        return True if a.box[3] <= b.box[1] else (False if ay >= by else None)
    if rel == "left of":
        return True if a.box[2] <= b.box[0] else (False if ax >= bx else None)
    return True if a.box[0] >= b.box[2] else (False if ax <= bx else None)


def resolve(objs, head: Desc, location: Optional[str] = None, relation: Optional[str] = None,
            anchor: Optional[Desc] = None, side: float = 1.0) -> Optional[int]:
    """Index of the single object an expression denotes, or None when it is ambiguous or empty."""
    cand = _matches(objs, head)
    if location is not None:
        return _location_pick(objs, cand, location, side=side)
    if relation is not None:
        anchors = _matches(objs, anchor)
        if len(anchors) != 1:
            return None
        b = anchors[0]
        verdicts = [(i, _relation(objs[i], objs[b], relation)) for i in cand if i != b]
        if any(v is None for _, v in verdicts):
            return None
        hits = [i for i, v in verdicts if v]
        return hits[0] if len(hits) == 1 else None
    return cand[0] if len(cand) == 1 else None


def expressions_for(objs, target: int, side: float) -> dict:
    """All valid expressions for ``target``, grouped by category.

    Categories: 'attribute' (colour/shape), 'size' (a size word is needed), 'location'
    (absolute position), 'relation' (relative to an anchor), 'mixed' (size word and location).
    A location, relation or size word is only added where the shorter description is
    ambiguous, so those categories cannot be solved from colour and shape alone.
    """
    t = objs[target]
    heads = [Desc(t.colour, t.shape), Desc(None, t.shape), Desc(t.colour, None)]
    sized = [Desc(h.colour, h.shape, t.size) for h in heads]
    found = {k: [] for k in ("attribute", "size", "location", "relation", "mixed")}
    for h in heads:
        if resolve(objs, h) == target:
            found["attribute"].append(h.text())
            continue
        for where, words in LOCATIONS.items():
            if resolve(objs, h, location=where, side=side) == target:
                found["location"].append(f"{h.text()} {words}")
        for j, b in enumerate(objs):
            if j == target:
                continue
            for anchor in (Desc(b.colour, b.shape), Desc(None, b.shape), Desc(b.colour, None)):
                if _matches(objs, anchor) != [j]:
                    continue
                for rel, words in RELATIONS.items():
                    if resolve(objs, h, relation=rel, anchor=anchor) == target:
                        found["relation"].append(f"{h.text()} {words} {anchor.text()}")
    for h in sized:
        if resolve(objs, h) == target:
            if resolve(objs, h._replace(size=None)) != target:
                found["size"].append(h.text())
            continue
        for where, words in LOCATIONS.items():
            if resolve(objs, h, location=where, side=side) == target:
                found["mixed"].append(f"{h.text()} {words}")
    return found
