"""StreamQA scenes: seeded episodes of coloured shapes with timestamped questions (numpy only).

An episode is ``n_frames`` frames at ``fps`` frames per second, ``size x size`` RGB pixels.
The frame is a 2x2 grid of cells (``top-left``, ``top-right``, ``bottom-left``,
``bottom-right``); each cell holds at most one object, each shape is on screen at most once,
so "the circle" always names one object. Frame 0 holds exactly one object (so "which shape
appeared first" has one answer); every later frame applies at most one event to the previous
scene: a shape **appears** in a free cell, **disappears**, **moves** to a free cell or
**changes colour**. The scene state (:class:`Obj` tuples per frame) is the oracle every answer
is computed from.

Question families (one-word answers from :data:`VOCABULARY`):

========== ================================================ =====================================
family     question                                         evidence time (seconds)
========== ================================================ =====================================
realtime   What color is the {shape} now?                   the last frame shown
position   Where is the {shape} now?                        the last frame shown
counting   How many different shapes have appeared so far?  oldest "last sighting" of a counted shape
backward   Which shape appeared first?                      0 (frame 0)
longrange  What color was the {shape} at the start?         0 (frame 0); asked >= LONGRANGE_MIN_AGE_S
                                                            after it, when the current frame no
                                                            longer shows that colour on that shape
========== ================================================ =====================================

A question asked at ``ask_time`` sees every frame with timestamp ``<= ask_time``; questions are
asked half a frame period after a frame, so the answer never depends on rounding. The
evidence age of a question is ``ask_time - evidence_time``: a cache policy that keeps only
recent frames should fail the questions with old evidence.

Everything is a pure function of ``(seed, params)``: the same seed gives the same scene,
pixels and questions on every machine (``numpy.random.default_rng``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 90, 245),
    "yellow": (240, 220, 40), "white": (235, 235, 235),
}
CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("1", "2", "3", "4")
FAMILIES = ("realtime", "position", "counting", "backward", "longrange")
#: Every answer StreamQA can ask for, per kind.
VOCABULARY = {"shape": SHAPES, "color": tuple(COLOURS), "position": CELLS, "count": COUNTS}
#: Longrange questions are asked at least this long after their evidence (frame 0).
LONGRANGE_MIN_AGE_S = 3.0

_EVENTS = ("appear", "disappear", "move", "recolour", "none")


@dataclass(frozen=True)
class Obj:
    """One object on screen: ``shape``, ``colour`` name, ``cell`` index into :data:`CELLS`,
    and a pixel jitter ``(dy, dx)`` of its centre inside the cell."""

    shape: str
    colour: str
    cell: int
    dy: int = 0
    dx: int = 0


@dataclass(frozen=True)
class EpisodeParams:
    """Generator parameters. ``size`` is the frame side in pixels (a multiple of 8);
    ``min_frames..max_frames`` the episode length; ``questions`` the questions per episode
    (fewer when an episode is too short); ``families`` the families to draw from."""

    size: int = 48
    fps: float = 2.0
    min_frames: int = 6
    max_frames: int = 12
    questions: int = 4
    families: tuple[str, ...] = FAMILIES
    noise: int = 6
    family_weights: tuple[float, ...] | None = None
    """Relative weight of each of ``families`` when a question's family is drawn (None: equal,
    families not yet asked in the episode first). Training uses it to ask more of the hard
    families; evaluation suites leave it None."""
    appear_weight: int = 4
    """Weight of the "appear" event among the possible events of a frame (others: disappear
    2, move 2, recolour 3, none 2): higher gives busier scenes."""

    def __post_init__(self):
        if self.size % 8 or self.size < 16:
            raise ValueError(f"size must be a multiple of 8 and >= 16, got {self.size}")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.family_weights is not None and (len(self.family_weights) != len(self.families)
                                                or min(self.family_weights) < 0 or not sum(self.family_weights) > 0):
            raise ValueError("family_weights needs one non-negative weight per family, not all zero")
        if self.appear_weight < 0:
            raise ValueError(f"appear_weight must be >= 0, got {self.appear_weight}")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown question families {bad}; known: {', '.join(FAMILIES)}")


@dataclass
class QA:
    """One question: asked at ``ask_time`` seconds (after frame ``after_frame``)."""

    family: str
    question: str
    answer: str
    ask_time: float
    after_frame: int
    evidence_time: float
    choices: list[str] = field(default_factory=list)


@dataclass
class Episode:
    """A generated episode: per-frame scene states, questions, and the parameters."""

    seed: int
    params: EpisodeParams
    states: list[tuple[Obj, ...]]
    questions: list[QA]

    @property
    def n_frames(self) -> int:
        return len(self.states)

    def timestamp(self, k: int) -> float:
        """Stream time of frame ``k`` in seconds."""
        return k / self.params.fps

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` as ``[size, size, 3]`` uint8 RGB (deterministic)."""
        return render(self.states[k], self.params.size, noise=self.params.noise, seed=(self.seed, k))

    def frames(self) -> np.ndarray:
        """All frames, ``[n_frames, size, size, 3]`` uint8."""
        return np.stack([self.frame(k) for k in range(self.n_frames)])

    def to_dict(self) -> dict:
        return {"seed": self.seed, "params": asdict(self.params),
                "states": [[asdict(o) for o in s] for s in self.states],
                "questions": [asdict(q) for q in self.questions]}


# ----------------------------------------------------------------------------- scene
def _evolve(rng: np.random.Generator, n_frames: int, size: int, appear_weight: int = 4) -> list[tuple[Obj, ...]]:
    jit = max(1, size // 24)

    def new_obj(shape, colour, cell):
        return Obj(shape, colour, int(cell), int(rng.integers(-jit, jit + 1)), int(rng.integers(-jit, jit + 1)))

    colours = list(COLOURS)
    first = new_obj(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))], rng.integers(4))
    states = [(first,)]
    for _ in range(1, n_frames):
        cur = list(states[-1])
        free_cells = [c for c in range(4) if all(o.cell != c for o in cur)]
        absent = [s for s in SHAPES if all(o.shape != s for o in cur)]
        options = []
        if free_cells and absent:
            options += ["appear"] * appear_weight
        if len(cur) > 1:
            options += ["disappear"] * 2
        if cur and free_cells:
            options += ["move"] * 2
        if cur:
            options += ["recolour"] * 3
        options += ["none"] * 2
        ev = options[rng.integers(len(options))]
        if ev == "appear":
            cur.append(new_obj(absent[rng.integers(len(absent))], colours[rng.integers(len(colours))],
                               free_cells[rng.integers(len(free_cells))]))
        elif ev == "disappear":
            cur.pop(int(rng.integers(len(cur))))
        elif ev == "move":
            i = int(rng.integers(len(cur)))
            cur[i] = new_obj(cur[i].shape, cur[i].colour, free_cells[rng.integers(len(free_cells))])
        elif ev == "recolour":
            i = int(rng.integers(len(cur)))
            others = [c for c in colours if c != cur[i].colour]
            o = cur[i]
            cur[i] = Obj(o.shape, others[rng.integers(len(others))], o.cell, o.dy, o.dx)
        states.append(tuple(sorted(cur, key=lambda o: o.cell)))
    return states


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``[side, side]`` mask of ``shape`` filling the box."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    c = side / 2.0
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (side / 2.0) ** 2
    if shape == "square":
        m = np.zeros((side, side), bool)
        b = max(1, side // 8)
        m[b:side - b, b:side - b] = True
        return m
    if shape == "triangle":      # apex up
        return (yy >= side * 0.08) & (np.abs(xx - c) <= (yy / side) * c)
    if shape == "cross":
        t = max(2, side // 3)
        lo, hi = (side - t) // 2, (side - t) // 2 + t
        m = np.zeros((side, side), bool)
        m[lo:hi, :] = True
        m[:, lo:hi] = True
        return m
    raise ValueError(f"unknown shape {shape!r}")


def render(state: tuple[Obj, ...], size: int, noise: int = 6, seed=(0, 0)) -> np.ndarray:
    """Draw ``state`` as a ``[size, size, 3]`` uint8 RGB frame: black background with uniform
    noise in ``[0, noise]``, each object a solid shape of side ``size // 3`` centred in its
    cell (plus its jitter)."""
    rng = np.random.default_rng([int(s) for s in seed] + [0x5EED])
    img = rng.integers(0, noise + 1, size=(size, size, 3), dtype=np.uint8) if noise else \
        np.zeros((size, size, 3), np.uint8)
    half, side = size // 2, size // 3
    for o in state:
        r, c = divmod(o.cell, 2)
        y0 = r * half + (half - side) // 2 + o.dy
        x0 = c * half + (half - side) // 2 + o.dx
        m = _shape_mask(o.shape, side)
        img[y0:y0 + side, x0:x0 + side][m] = COLOURS[o.colour]
    return img


def last_frame_before(ask_time: float, fps: float, n_frames: int) -> int:
    """Index of the last frame (timestamp ``k / fps``) captured at or before ``ask_time``
    seconds, capped at ``n_frames - 1``: the frames a question asked then can see (the
    runner's rule: a frame runs before a question when its capture time is <= the ask time)."""
    return min(int(math.floor(ask_time * fps + 1e-9)), n_frames - 1)


# ----------------------------------------------------------------------------- answers
def seen_shapes(states, upto: int) -> dict[str, int]:
    """Shapes on screen in any frame ``0..upto``, each with the last frame it was seen in."""
    last: dict[str, int] = {}
    for k in range(upto + 1):
        for o in states[k]:
            last[o.shape] = k
    return last


def _find(state, shape):
    return next((o for o in state if o.shape == shape), None)


def _questions(rng: np.random.Generator, states, params: EpisodeParams) -> list[QA]:
    fps, n = params.fps, len(states)
    t = lambda k: k / fps                                    # noqa: E731
    first = states[0][0]
    long_frames = int(np.ceil(LONGRANGE_MIN_AGE_S * fps))
    slots = list(range(1, n))
    rng.shuffle(slots)
    out: list[QA] = []
    families = list(params.families)
    for k in slots:
        if len(out) >= params.questions:
            break
        cands = []
        for fam in families:
            if fam in ("realtime", "position") and states[k]:
                cands.append(fam)
            elif fam == "counting":
                cands.append(fam)
            elif fam == "backward" and k >= 2:
                cands.append(fam)
            elif fam == "longrange" and k >= long_frames:
                now = _find(states[k], first.shape)
                if now is None or now.colour != first.colour:
                    cands += [fam, fam]      # rare: weigh it up
        if not cands:
            continue
        if params.family_weights is not None:
            w = dict(zip(params.families, params.family_weights))
            p = np.asarray([w[f] for f in cands], dtype=np.float64)
            if not p.sum() > 0:
                continue
            fam = cands[int(rng.choice(len(cands), p=p / p.sum()))]
        else:
            used = {q.family for q in out}
            pool = [f for f in cands if f not in used] or cands
            fam = pool[rng.integers(len(pool))]
        ask = t(k) + 0.5 / fps
        if fam in ("realtime", "position"):
            o = states[k][rng.integers(len(states[k]))]
            if fam == "realtime":
                qa = QA(fam, f"What color is the {o.shape} now?", o.colour, ask, k, t(k), list(COLOURS))
            else:
                qa = QA(fam, f"Where is the {o.shape} now?", CELLS[o.cell], ask, k, t(k), list(CELLS))
        elif fam == "counting":
            last = seen_shapes(states, k)
            qa = QA(fam, "How many different shapes have appeared so far?", str(len(last)), ask, k,
                    t(min(last.values())), list(COUNTS))
        elif fam == "backward":
            qa = QA(fam, "Which shape appeared first?", first.shape, ask, k, 0.0, list(SHAPES))
        else:
            qa = QA(fam, f"What color was the {first.shape} at the start?", first.colour, ask, k, 0.0,
                    list(COLOURS))
        out.append(qa)
    return sorted(out, key=lambda q: q.ask_time)


def make_episode(seed: int, params: EpisodeParams | None = None) -> Episode:
    """Generate episode ``seed`` (any non-negative int): scene, frames (on demand) and
    questions. Deterministic in ``(seed, params)``."""
    params = params or EpisodeParams()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), 0x57AE])
    n = int(rng.integers(params.min_frames, params.max_frames + 1))
    states = _evolve(rng, n, params.size, params.appear_weight)
    qs = _questions(rng, states, params)
    return Episode(int(seed), params, states, qs)
