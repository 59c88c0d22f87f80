"""`PackedDataset`: the shards of `prepare` as a resumable, rank-sharded, globally shuffled stream of samples.

Design, for pretraining on hundreds of GPUs:

* **O(1) file descriptors.** A 960-GPU run died of FD exhaustion when every process kept every shard open. Here a
  shard is mapped on first use (``os.open``, ``mmap``, ``os.close``) and kept in a small LRU of at most
  ``max_open_shards`` mappings; evicted ones are unmapped. (Python < 3.13 keeps one duplicated descriptor per
  mapping, so the bound is ``max_open_shards`` descriptors per process, whatever the number of shards.)
* **A global shuffle without a permutation array.** Epoch ``e`` reads the samples in the order of a pseudo-random
  permutation of ``[0, N)`` keyed by ``(seed, e)``: a balanced Feistel network on the smallest even power of two
  >= N with cycle walking. It is a true permutation, computed per position in O(1) time and memory, so N = 250 M
  samples costs no 2 GB index on each of 960 processes, and position p of any epoch is computable at once.
* **A world-size-independent cursor.** Samples are consumed as one global stream of positions
  ``q = 0, 1, 2, ...`` (epoch ``q // N``, position ``q % N`` in that epoch's permutation), interleaved across ranks:
  at cursor ``c`` rank ``r`` of ``W`` reads ``c + r, c + r + W, c + r + 2W, ...``. After every rank has read k
  samples the cursor is ``c + k W`` on all of them, and that one number (with the seed) is the state. Resuming with
  another world size just interleaves the remaining positions differently, so every remaining sample of the epoch is
  still read exactly once. Epochs follow each other in the same stream, so ranks never run out unevenly inside an
  endless run; with ``num_epochs`` set the stream ends after that many epochs (the ranks' last step may then differ
  by one sample: use ``drop_last=True`` to end all ranks after the same number of samples).

`state_dict()` / `load_state_dict()` hold that cursor; they assume the ranks are in lockstep (the same number of
samples taken on every rank when the state is saved, as in data-parallel training), so saving rank 0's state is
enough. Each sample is yielded as ``{"input_ids": LongTensor[seq_len], "position": q, "index": sample}``;
``position`` is unique over the whole run, and `masking.MLMCollator` derives each sample's masks from it, so masks
too are identical after a resume at any world size.

**Integrity.** Construction runs `format.check_shard_files` (the manifest against every shard's ``.json`` and
sizes: a lie is a `format.CorruptDataError`; ``verify_checksums`` hashes the shards too). Every sample read is
checked for ids outside the vocabulary and, when prepare packed with [CLS], for a [CLS] first: a cost of one max
over ``seq_len`` ids, and a flipped byte is then named as corruption of that shard, never as "another tokenizer".

**DataLoader workers.** Use ``DataLoader(dataset, batch_size=B, num_workers=0)``. Reading a sample is a copy of
8 KiB from the page cache, not worth a worker, and a worker holds its own copy of the cursor that the main process
never sees, so ``state_dict()`` would be wrong: iterating inside a worker raises an error that says so. Masking
(the collate function) runs in the main process too; it takes about half a millisecond per 4,096-token sample.
"""

from __future__ import annotations

import collections
import mmap
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .fingerprint import check_tokenizer
from .format import CorruptDataError, check_shard_files, dtype_from_name, read_manifest, shard_infos

STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of an integer (the SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """`splitmix64` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64, which is what we want)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random permutation of ``[0, n)`` evaluated per element (O(1) memory).

    Balanced Feistel network over ``2 * half`` bits (the smallest even width covering n) with 6 rounds of a
    SplitMix64 round function; values that land outside ``[0, n)`` are encrypted again (cycle walking), which stays
    a bijection on ``[0, n)`` and needs fewer than 4 rounds of walking on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"n={n}: a permutation needs at least one element")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(splitmix64((key + 0x632BE59BD9B4E019 * (r + 1)) & _MASK64))
                     for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix_array(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside [0, {self.n})")
        y = self._encrypt(x)
        outside = y >= self.n
        while outside.any():
            y[outside] = self._encrypt(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)


class _ShardMaps:
    """An LRU of memory-mapped shards: at most ``capacity`` mappings (and so descriptors) at a time."""

    def __init__(self, paths: list[Path], seq_len: int, dtype: np.dtype, capacity: int, random_access: bool,
                 num_rows: list[int] | None = None):
        self.paths = paths
        self.sizes = None if num_rows is None else [n * seq_len * np.dtype(dtype).itemsize for n in num_rows]
        self.seq_len = seq_len
        self.dtype = dtype
        self.capacity = capacity
        self.random_access = random_access
        self._maps: collections.OrderedDict = collections.OrderedDict()

    def rows(self, shard: int) -> np.ndarray:
        entry = self._maps.get(shard)
        if entry is not None:
            self._maps.move_to_end(shard)
            return entry[1]
        while len(self._maps) >= self.capacity:
            self._evict()
        # Shards are checked at start; one deleted or cut short since (mid-run) is named here, at its next mapping.
        # One cut short while mapped cannot be: reading past its new end is a SIGBUS (the watchdog module's
        # crash stacks show where), and the next start's size check names it.
        fix = "restore the data folder (copy it again or re-run prepare), then continue with --resume auto"
        try:
            fd = os.open(self.paths[shard], os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptDataError(f"shard {str(self.paths[shard])!r} is gone: it was there when the run started "
                                   f"and was deleted or moved since; {fix}") from None
        try:
            size = os.fstat(fd).st_size
            if self.sizes is not None and size != self.sizes[shard]:
                raise CorruptDataError(f"shard {str(self.paths[shard])!r} holds {size:,} bytes, its manifest "
                                       f"{self.sizes[shard]:,}: it was cut short or rewritten after the run "
                                       f"started; {fix}")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the mapping stays valid without it
        if self.random_access and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)  # shuffled reads: read-ahead would fetch pages never used
        rows = np.frombuffer(mm, dtype=self.dtype).reshape(-1, self.seq_len)
        self._maps[shard] = (mm, rows)
        return rows

    def _evict(self) -> None:
        _, (mm, rows) = self._maps.popitem(last=False)
        del rows
        try:
            mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes when it does
            pass

    def close(self) -> None:
        while self._maps:
            self._evict()

    def __len__(self) -> int:
        return len(self._maps)


class PackedDataset(IterableDataset):
    """Samples of a `prepare` output folder, shuffled per epoch, sharded over ranks, resumable.

    data_dir: the folder with ``manifest.json``.
    seed: shuffle seed (default: the seed recorded by prepare).
    rank, world_size: this process's data-parallel rank and their number (default: torch.distributed's, if
        initialised, else 0 and 1).
    shuffle: False reads samples in stored order (still interleaved over ranks).
    num_epochs: None for an endless stream (the usual pretraining setup: stop after a number of steps); else the
        stream ends after that many epochs.
    drop_last: with ``num_epochs``, end every rank after the same number of samples (the final < world_size samples
        of the last epoch are then not read).
    max_open_shards: how many shards stay mapped at once (one descriptor each).
    shards: indices (in manifest order) of the shards to read, None for all; e.g. all but the last to hold that one
        out for evaluation. Samples are numbered over the selected shards only; the selection is part of the state.
    tokenizer: if given, `check_tokenizer` first (a mismatch is a `TokenizerMismatchError`).
    verify_checksums: hash every shard against the manifest on construction (reads everything once; sizes are always
        checked).
    """

    def __init__(self, data_dir, *, seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, num_epochs: int | None = None, drop_last: bool = False,
                 max_open_shards: int = 8, tokenizer=None, verify_checksums: bool = False, shards=None):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        check_shard_files(self.data_dir, self.manifest, checksums=verify_checksums)
        if tokenizer is not None:
            check_tokenizer(self.data_dir, tokenizer)
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < "
                             f"world_size")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs={num_epochs}: must be >= 1, or None for an endless stream")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards={max_open_shards}: must be >= 1")
        self.rank, self.world_size = rank, world_size
        self.seed = int(self.manifest["seed"] if seed is None else seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_last = drop_last
        self.seq_len = int(self.manifest["seq_len"])
        self.dtype = dtype_from_name(self.manifest["dtype"])
        self.special_token_ids = dict(self.manifest["special_token_ids"])
        self.vocab_size = int(self.manifest["vocab_size"])
        # Every row prepare writes starts with [CLS] when it packs with cls_at_start: a row that does not is read
        # at the wrong offset (a seq_len that is not the shards') or corrupt.
        packing = self.manifest.get("packing", {})
        self._row_start = self.special_token_ids.get("cls") if packing.get("cls_at_start") else None
        infos = shard_infos(self.manifest)
        if shards is not None:
            shards = [int(i) for i in shards]
            bad = [i for i in shards if not 0 <= i < len(infos)]
            if bad or len(set(shards)) != len(shards) or not shards:
                raise ValueError(f"shards={shards}: need distinct indices in [0, {len(infos)}) (the manifest lists "
                                 f"{len(infos)} shards), at least one")
            infos = [infos[i] for i in shards]
        self.shards = shards
        counts = np.array([info.num_sequences for info in infos], dtype=np.int64)
        self._shard_end = np.cumsum(counts)  # exclusive end sample index of each shard
        self._shard_start = self._shard_end - counts
        self.num_samples = int(counts.sum())
        if self.num_samples == 0:
            raise ValueError(f"{str(self.data_dir)!r} holds no samples (the input had no text): prepare more input")
        self._paths = [self.data_dir / info.tokens_file for info in infos]
        self.max_open_shards = max_open_shards
        self._maps = _ShardMaps(self._paths, self.seq_len, self.dtype, max_open_shards, shuffle, counts.tolist())
        self._position = 0  # global cursor: stream positions consumed by all ranks together
        self._perm_cache: tuple[int, FeistelPermutation] | None = None

    # -- random access ---------------------------------------------------------------------------------------
    def sample(self, index: int) -> np.ndarray:
        """Sample ``index`` (stored order) as an int64 array of ``seq_len`` ids."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} outside [0, {self.num_samples})")
        shard = int(np.searchsorted(self._shard_end, index, side="right"))
        rows = self._maps.rows(shard)
        row = int(index - self._shard_start[shard])
        ids = rows[row]
        # Exact and cheap (one max over seq_len ids, about 3 us for 4,096): every sample read is checked, instead
        # of a pass over all shards at start-up.
        top = int(ids.max())
        if top >= self.vocab_size or (self._row_start is not None and ids.item(0) != self._row_start):
            self._corrupt(shard, row, index, ids, top)
        return ids.astype(np.int64)

    def _corrupt(self, shard: int, row: int, index: int, ids: np.ndarray, top: int):
        path = str(self._paths[shard])
        where = f"shard {path!r} row {row} (sample {index})"
        check = ("Check every shard with verify_checksums=True (data.verify_checksums=true), then copy the folder "
                 "again or re-run prepare")
        if top >= self.vocab_size:
            position = int(np.argmax(ids >= self.vocab_size))
            raise CorruptDataError(
                f"{where} holds token id {top} at position {position}, outside the vocabulary of {self.vocab_size} "
                f"ids its manifest records: the shard is corrupt (its bytes changed after prepare; no tokenizer "
                f"can have written that id, and a tokenizer mismatch is the fingerprint check's error). {check}")
        raise CorruptDataError(
            f"{where} starts with id {int(ids[0])}, not [CLS] ({self._row_start}), though prepare starts every row "
            f"with it: the rows are read at the wrong offset (the manifest's seq_len={self.seq_len} is not the one "
            f"the shards were packed with) or the shard is corrupt. {check}")

    def permutation(self, epoch: int) -> FeistelPermutation | None:
        if not self.shuffle:
            return None
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            key = splitmix64(splitmix64(self.seed & _MASK64) ^ (epoch & _MASK64))
            self._perm_cache = (epoch, FeistelPermutation(self.num_samples, key))
        return self._perm_cache[1]

    def index_at(self, position: int) -> int:
        """The sample read at global stream ``position`` (epoch ``position // num_samples``)."""
        epoch, pos = divmod(position, self.num_samples)
        perm = self.permutation(epoch)
        return pos if perm is None else int(perm([pos])[0])

    # -- iteration -------------------------------------------------------------------------------------------
    @property
    def end_position(self) -> int | None:
        """Where the stream ends (None: endless)."""
        if self.num_epochs is None:
            return None
        end = self.num_epochs * self.num_samples
        if self.drop_last:
            end -= (end - self._position) % self.world_size
        return end

    def __iter__(self):
        if get_worker_info() is not None:
            raise RuntimeError(
                "PackedDataset was iterated inside a DataLoader worker (num_workers > 0): each worker would hold "
                "its own copy of the resume cursor and state_dict() in the main process would be wrong. Use "
                "DataLoader(..., num_workers=0): reading a sample is an 8 KiB copy from the page cache")
        end = self.end_position
        w, r = self.world_size, self.rank
        q = self._position + r
        block = 1024
        while end is None or q < end:
            epoch = q // self.num_samples
            epoch_end = (epoch + 1) * self.num_samples
            stop = epoch_end if end is None else min(epoch_end, end)
            positions = np.arange(q, min(stop, q + block * w), w, dtype=np.int64)
            if len(positions) == 0:
                break
            within = positions - epoch * self.num_samples
            perm = self.permutation(epoch)
            indices = within if perm is None else perm(within)
            for position, index in zip(positions.tolist(), indices.tolist()):
                ids = torch.from_numpy(self.sample(index))
                cursor = position - r + w
                self._position = cursor if end is None else min(cursor, end)
                yield {"input_ids": ids, "position": position, "index": index}
            q = int(positions[-1]) + w
        if end is not None:
            self._position = max(self._position, end)

    # -- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, consumed = divmod(self._position, self.num_samples)
        return {
            "version": STATE_VERSION, "seed": self.seed, "epoch": epoch, "consumed_in_epoch": consumed,
            "global_position": self._position, "num_samples": self.num_samples, "shuffle": self.shuffle,
            "data_manifest_sha256": self.manifest["_sha256"], "shards": self.shards,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped (saved at any world size); errors if it belongs to other data."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r}: this PackedDataset reads version "
                             f"{STATE_VERSION}")
        if state.get("shards") != self.shards:
            raise ValueError(f"the state was saved reading shards {state.get('shards')} (None: all), this dataset "
                             f"reads {self.shards}: construct it with shards={state.get('shards')}")
        if state["num_samples"] != self.num_samples or state["data_manifest_sha256"] != self.manifest["_sha256"]:
            raise ValueError(
                f"the state was saved on other data ({state['num_samples']} samples, manifest "
                f"{state['data_manifest_sha256'][:12]}) than {str(self.data_dir)!r} ({self.num_samples} samples, "
                f"manifest {self.manifest['_sha256'][:12]}): resume on the data folder the run started with")
        if state["shuffle"] != self.shuffle:
            raise ValueError(f"the state was saved with shuffle={state['shuffle']}, this dataset has "
                             f"shuffle={self.shuffle}: construct it with shuffle={state['shuffle']}")
        position = state["epoch"] * self.num_samples + state["consumed_in_epoch"]
        if position != state.get("global_position", position):
            raise ValueError(f"inconsistent state: epoch {state['epoch']} x {self.num_samples} + "
                             f"{state['consumed_in_epoch']} != global_position {state['global_position']}")
        self.seed = int(state["seed"])  # the cursor only means something in the permutation it was taken in
        self._perm_cache = None
        self._position = position

    # -- housekeeping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every shard (they are mapped again on demand)."""
        self._maps.close()

    @property
    def open_shards(self) -> int:
        return len(self._maps)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None  # mappings do not cross processes; rebuilt on unpickling
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._maps = _ShardMaps(self._paths, self.seq_len, self.dtype, self.max_open_shards, self.shuffle)
