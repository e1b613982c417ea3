"""Episodes on disk in the Memory Maze offline-dataset layout, checked reading, and a clip loader.

One compressed NPZ per episode of T steps, every per-step array with T+1 rows (row 0 is the
reset frame):

    image        (T+1, 64, 64, 3) uint8   first-person frames
    action       (T+1, 6) float32         one-hot action that *led to* image[t]; row 0 all zero
    reward       (T+1,) float32           reward received on arriving at image[t]
    terminal     (T+1,) bool              always False (the maze never terminates)
    reset        (T+1,) bool              True at row 0
    agent_pos    (T+1, 2) float32         (x, y) in tiles
    agent_dir    (T+1, 2) float32         unit heading vector
    agent_pose   (T+1, 3) int32           exact lattice pose (x, y in 1/12 tile, heading 0..15)
    target_index (T+1,) int32; target_color (T+1, 3) uint8; target_pos (T+1, 2) float32
    targets_pos  (T+1, K, 2) float32      all ball positions, in tiles
    maze_layout  (S, S) uint8             1 = wall
    seed, policy                          the reset seed of the maze and the policy name

Real Memory Maze episodes (which have image/action/reward and more) load with the same reader.
Our own API counts actions the other way round (`context_actions[i]` is taken *after* frame i);
`episode_actions` converts.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ssm_gym.maze.sim import N_ACTIONS, TURN_ONLY

REQUIRED = ("image", "action", "reward")
START_ACTION = N_ACTIONS  # the "no previous action" id used at the first frame of an episode


class DatasetError(ValueError):
    """A dataset file is missing, truncated or malformed. The message names the file."""


def save_episode(path: str | Path, episode: dict[str, np.ndarray]) -> None:
    """Write one episode atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **episode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _member_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of all arrays in an NPZ, reading only the .npy headers."""
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            headers[name.removesuffix(".npy")] = (shape, dtype)
    return headers


def _check_layout(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> int:
    missing = [k for k in REQUIRED if k not in shapes]
    if missing:
        raise DatasetError(f"{path}: missing arrays {missing} (has {sorted(shapes)})")
    img = shapes["image"]
    if len(img) != 4 or img[1:] != (64, 64, 3) or dtypes["image"] != np.uint8:
        raise DatasetError(f"{path}: 'image' must be uint8 (T+1, 64, 64, 3), got {dtypes['image']} {img}")
    n = img[0]
    if n < 2:
        raise DatasetError(f"{path}: episode has {n} frames, need at least 2")
    if shapes["action"] != (n, N_ACTIONS):
        raise DatasetError(f"{path}: 'action' must be one-hot ({n}, {N_ACTIONS}), got {shapes['action']}")
    for key, shape in shapes.items():
        if key in ("maze_layout", "seed", "policy", "image", "action"):
            continue
        if len(shape) == 0 or shape[0] != n:
            raise DatasetError(f"{path}: '{key}' has {shape[0] if shape else 0} rows but 'image' has {n}")
    return n - 1


def check_episode_file(path: str | Path) -> int:
    """Cheap check of one file (zip directory and array headers only); returns its T."""
    path = Path(path)
    try:
        headers = _member_headers(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt episode file ({type(e).__name__}: {e})") from None
    return _check_layout(path, {k: s for k, (s, _) in headers.items()}, {k: d for k, (_, d) in headers.items()})


def load_episode(path: str | Path) -> dict[str, np.ndarray]:
    """Read and fully verify one episode (CRC of every array, shapes, one-hot actions)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            ep = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise DatasetError(f"{path}: truncated or corrupt episode file ({type(e).__name__}: {e})") from None
    _check_layout(path, {k: v.shape for k, v in ep.items()}, {k: v.dtype for k, v in ep.items()})
    a = ep["action"]
    if not (np.all((a == 0) | (a == 1)) and np.all(a[1:].sum(1) == 1)):
        raise DatasetError(f"{path}: 'action' rows 1.. must be one-hot")
    return ep


def episode_actions(episode: dict[str, np.ndarray]) -> np.ndarray:
    """(T,) int64 actions in our convention: actions[i] is taken after image[i]."""
    return episode["action"][1:].argmax(-1).astype(np.int64)


def episode_prev_actions(episode: dict[str, np.ndarray]) -> np.ndarray:
    """(T+1,) int64: the action that led to each frame, `START_ACTION` at the first frame."""
    return np.concatenate([[START_ACTION], episode_actions(episode)]).astype(np.int64)


def context_window(episode: dict[str, np.ndarray], last: int, context: int,
                   prev: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real history that ends at frame ``last``, as `RolloutEngine.reset` and the env's
    ``context_obs`` take it: ``(frames (context, H, W, C), actions (context - 1,))``, where
    ``actions[i]`` was taken after ``frames[i]``. ``prev``: the episode's `episode_prev_actions`,
    if already made."""
    if not 1 <= context <= last + 1:
        raise ValueError(f"a context of {context} frames cannot end at frame {last}")
    prev = episode_prev_actions(episode) if prev is None else prev
    return episode["image"][last - context + 1:last + 1], prev[last - context + 2:last + 1]


def episode_effective_actions(episode: dict[str, np.ndarray], path: str | Path = "episode") -> np.ndarray:
    """(T+1,) int64: `episode_prev_actions` as carried out: a move that a wall cancelled (the agent's
    position unchanged after a forward action) becomes the turn it still made, or the no-op.
    Needs the episode's `agent_pos`."""
    if "agent_pos" not in episode:
        raise DatasetError(f"{path}: no 'agent_pos': the moves a wall cancelled cannot be told apart without it")
    prev = episode_prev_actions(episode)
    pos = episode["agent_pos"]
    if len(pos) != len(prev):
        raise DatasetError(f"{path}: 'agent_pos' has {len(pos)} rows, 'action' {len(prev)}")
    stayed = np.zeros(len(prev), dtype=bool)
    stayed[1:] = (pos[1:] == pos[:-1]).all(-1)
    out = prev.copy()
    moves = stayed & (prev < N_ACTIONS)
    out[moves] = TURN_ONLY[prev[moves]]
    return out


def list_episodes(directory: str | Path | Sequence[str | Path]) -> list[tuple[Path, int]]:
    """All episode files of a folder (or of several, in the order given) with their lengths;
    rejects any bad file by name."""
    if not isinstance(directory, (str, Path)):
        folders = list(directory)
        if not folders:
            raise DatasetError("no episode folder given")
        return [ep for d in folders for ep in list_episodes(d)]
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise DatasetError(f"{directory}: no episode files (*.npz); run `python -m training.collect` first")
    return [(f, check_episode_file(f)) for f in files]


def _reward_frames(episode: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """(T+1,) bool: the frames a reward was paid into."""
    return episode["reward"] > 0


def _blocked_frames(episode: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """(T+1,) bool: the frames after a move that a wall cancelled (see `episode_effective_actions`)."""
    return episode_effective_actions(episode, path) != episode_prev_actions(episode)


class ClipDataset(torch.utils.data.IterableDataset):
    """Endless random training clips of `clip_len` consecutive frames from a folder of episodes
    (or several folders, e.g. `data/maze` and `data/maze-stumble`, sampled as one).

    Each item is a dict of tensors: `frames` (L, 64, 64, 3) uint8, `prev_actions` (L,) int64 (the
    action that led to each frame; `START_ACTION` at an episode's first frame), `rewards` and
    `terminals` (L,) float32 (for the transition into each frame); with `effective_actions=True`
    also `effective_actions` (L,) int64 (`episode_effective_actions`: the moves walls cancelled
    taken out; needs `agent_pos` in every episode). Clips are drawn uniformly over
    all valid start positions from a seeded generator (or, a share `reward_clip_prob` of them,
    around a reward event, and a share `blocked_clip_prob` around a move a wall cancelled), and
    the last `cache_size` episodes read are kept in memory.
    """

    def __init__(self, directory: str | Path, clip_len: int, seed: int = 0, cache_size: int = 256,
                 reward_clip_prob: float = 0.0, effective_actions: bool = False, blocked_clip_prob: float = 0.0):
        for name, p in (("reward_clip_prob", reward_clip_prob), ("blocked_clip_prob", blocked_clip_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if reward_clip_prob + blocked_clip_prob > 1.0:
            raise ValueError(f"reward_clip_prob + blocked_clip_prob must be at most 1, got "
                             f"{reward_clip_prob} + {blocked_clip_prob}")
        self.episodes = list_episodes(directory)
        self.seed, self.cache_size = seed, cache_size
        self.effective_actions = effective_actions
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        kinds = [(name, p, what, find) for name, p, what, find in (
            ("reward_clip_prob", reward_clip_prob, "has a reward", _reward_frames),
            ("blocked_clip_prob", blocked_clip_prob, "has a move a wall cancelled", _blocked_frames)) if p > 0]
        # (share of clips, (K, 2) (episode, frame) events those clips are drawn around), in draw order
        self.event_draws: list[tuple[float, np.ndarray]] = []
        for (name, p, what, _), events in zip(kinds, self._events([k[3] for k in kinds])):
            if not len(events):
                raise DatasetError(f"{directory}: {name} > 0 but no episode {what}")
            self.event_draws.append((p, events))
        self.set_clip_len(clip_len)

    def _events(self, finds) -> list[np.ndarray]:
        """Per `find` in `finds`: (K, 2) int64 (episode, frame) of every frame `find(episode, path)`
        marks, frame > 0 (a clip can hold the frame before it). Each episode is read once for all."""
        rows: list[list[tuple[int, int]]] = [[] for _ in finds]
        if finds:
            for i, (path, _) in enumerate(self.episodes):
                ep = load_episode(path)
                for found, find in zip(rows, finds):
                    found += [(i, int(t)) for t in np.flatnonzero(find(ep, path)) if t > 0]
        return [np.array(r, dtype=np.int64).reshape(-1, 2) for r in rows]

    def set_clip_len(self, clip_len: int) -> None:
        """Change the clip length (curriculum stages share one dataset and its episode cache)."""
        lengths = np.array([t + 1 for _, t in self.episodes])
        if clip_len < 1 or clip_len > lengths.max():
            raise ValueError(f"clip_len must be in [1, {lengths.max()}] for this data, got {clip_len}")
        starts = np.maximum(lengths - clip_len + 1, 0)
        self.clip_len, self.weights = clip_len, starts / starts.sum()

    def sample_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """`batch_size` clips stacked along a new first dimension."""
        clips = [self.sample(rng) for _ in range(batch_size)]
        return {k: torch.stack([c[k] for c in clips]) for k in clips[0]}

    def preload(self) -> None:
        """Read every episode into the cache now (when it holds them all), so that a timed
        training run does not spend its budget on first reads. Files are read by a few threads
        (decompression releases the GIL): a lent GPU machine reads thousands of episodes in
        seconds instead of a minute."""
        todo = [i for i in range(len(self.episodes)) if i not in self._cache]
        todo = todo[:max(0, self.cache_size - len(self._cache))]  # never past cache_size
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(self._read, i) for i in todo]
            try:
                for i, f in zip(todo, futures):
                    self._cache[i] = f.result()
            except BaseException:  # a bad file: stop reading the rest and raise its error
                for f in futures:
                    f.cancel()
                raise

    def _read(self, i: int) -> dict[str, np.ndarray]:
        ep = load_episode(self.episodes[i][0])
        prev = episode_prev_actions(ep)
        terminals = ep.get("terminal", np.zeros(len(prev), dtype=bool)).astype(np.float32)
        item = {"frames": ep["image"], "prev_actions": prev, "rewards": ep["reward"].astype(np.float32),
                "terminals": terminals}
        if self.effective_actions:
            item["effective_actions"] = episode_effective_actions(ep, self.episodes[i][0])
        return item

    def _episode(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = self._read(i)
        return self._cache[i]

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """A random valid clip position: (episode index, first frame). Uniform over all positions,
        except that a share `reward_clip_prob` of clips is drawn around a uniformly chosen reward
        event and a share `blocked_clip_prob` around a move a wall cancelled (the event after the
        clip's first frame): both are rare in explorer data (touching the target: under 1% of
        frames) and are what the model most often gets wrong."""
        if self.event_draws:
            u = rng.random()  # (drawn only with an oversampling share: plain clips keep their stream)
            for p, events in self.event_draws:
                if u < p:
                    i, e = (int(v) for v in events[rng.integers(len(events))])
                    lo, hi = max(0, e - self.clip_len + 1), min(e - 1, self.episodes[i][1] + 1 - self.clip_len)
                    if lo <= hi:  # else the episode is too short for a clip around this event: draw uniformly
                        return i, int(rng.integers(lo, hi + 1))
                    break
                u -= p
        i = int(rng.choice(len(self.episodes), p=self.weights))
        return i, int(rng.integers(0, self.episodes[i][1] + 1 - self.clip_len + 1))

    def clip(self, i: int, t0: int) -> dict[str, torch.Tensor]:
        """The clip of episode i that starts at frame t0."""
        ep = self._episode(i)
        return {k: torch.from_numpy(np.ascontiguousarray(v[t0 : t0 + self.clip_len])) for k, v in ep.items()}

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.clip(*self.draw(rng))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            yield self.sample(rng)
