"""ATSTModel: front end + encoder + pooling, from audio to clip and frame embeddings.

Long audio is cut into windows of the spectrogram that fit the positional table: 1000 frames
(250 tokens, 10 s, for the official models) for frame embeddings and ATST-Frame clip embeddings,
601 frames (6 s) for the ATST-Clip clip embedding, as its linear evaluation does. Windows of all items are run through the
encoder together, in padded batches with key-padding masks (on a CPU, of windows of similar lengths), so a batch equals
one-by-one calls.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Iterator

import torch
from torch import Tensor, nn

from .audio import SAMPLE_RATE, to_waveforms
from .config import ModelConfig
from .encoder import ATSTEncoder, EncoderOutput
from .errors import InputError, SlowPrecisionWarning
from .frontend import LogMelFrontend
from .heads import HEADS, HeadSpec, default_labels
from .precision import PRECISIONS, slow_precision_message
from .windows import ChunkPooling, FiniteCheck, FramePooling, Window, encoder_passes, plan_windows, runs, stack_windows

__all__ = ["ATSTModel"]

def _gathers_frames(device: torch.device) -> bool:
    """Whether frame embeddings are written with one gather per block for a whole batch of windows
    (GPUs, where kernel launches cost) rather than one concatenation per run of windows that fill
    consecutive rows of one target (CPUs, where bytes cost)."""
    return device.type != "cpu"


def _runs(targets: list[Tensor], rows: list[int], n_tokens: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive windows with the same number of tokens that fill
    consecutive rows of one target (the items of a batch, the windows of a clip)."""

    def breaks(start: int, end: int) -> bool:
        return (targets[end] is not targets[start] or n_tokens[end] != n_tokens[start]
                or rows[end] != rows[start] + (end - start) * n_tokens[start])

    return runs(len(rows), breaks)


class ATSTModel(nn.Module):
    """An ATST encoder with its front end; turns 16 kHz audio into embeddings.

    Build it with :func:`atst_features.load_model`. ``audio`` arguments accept a tensor or array
    ``[N]`` / ``[B, N]`` of floats in [-1, 1], a list of 1-D ones of different lengths, or a file
    path; ``sample_rate`` is the rate of the given samples (default 16000; other rates are
    resampled with soxr; files use their own rate). Results are on the model's device.
    """

    sample_rate = SAMPLE_RATE  # FrontendConfig holds every model to it
    reference_clip_chunk = 601  # ATST-Clip clip-embedding chunk (6 s), as in the reference linear evaluation

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.frontend = LogMelFrontend(config.frontend)
        self.encoder = ATSTEncoder(config.encoder)
        self.head: nn.Module | None = None  # a head of the kind config.head_type names (heads.HEADS)
        if config.num_classes:
            self.head = HEADS[config.head_type].new(config.encoder, config.num_classes, config.head_norm)
        self.provenance: dict = {}  # where the weights came from; pretrained.save_pretrained writes it
        self.precision: str | None = None  # None: compute and output in the weights' dtype

    def set_precision(self, precision: str) -> "ATSTModel":
        """Choose the encoder's compute precision; outputs are float32 in every mode. Returns the model.

        ``"bf16"`` / ``"fp16"``: the encoder in bfloat16 / float16 (its matrix products, attention
        and LayerNorm still accumulate in float32): the fastest. ``"bf16-mixed"`` / ``"fp16-mixed"``:
        only matrix products and attention in 16 bits (linear weights cast once, here), the residual
        sum and LayerNorm in float32, under ``torch.autocast``: a little closer to float32, about 10 %
        slower. On CPUs that multiply bf16 in hardware (AMX, AVX512-BF16) the bf16 modes are several
        times faster than ``"fp32"``; on GPUs all 16-bit modes are. On a CPU without fast kernels for
        the 16-bit type (no AVX512, e.g. AVX2 only) they are several times slower, and a
        :class:`SlowPrecisionWarning` says so. The front end and heads stay
        float32. The weights must be float32 (no ``dtype=`` at load); to change modes, reload.
        """
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == self.precision:
            return self
        if self.precision not in (None, "fp32"):
            raise InputError(f"this model already runs in {self.precision}; load it again for {precision}")
        if self.dtype != torch.float32:
            raise InputError(f"precision={precision!r} needs float32 weights, these are {self.dtype}; load without dtype=")
        half, mixed = PRECISIONS[precision]
        if slow := slow_precision_message(f"precision={precision!r}", half, self.device.type):
            warnings.warn(f"{slow}; use fp32", SlowPrecisionWarning, stacklevel=2)
        if mixed:
            for module in self.encoder.modules():
                if isinstance(module, nn.Linear):
                    module.to(half)
        elif half is not None:
            self.encoder.to(half)
        self.precision = precision
        return self

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype of the embeddings returned: float32 once a precision is set, else the weights' dtype."""
        return self.dtype if self.precision is None else torch.float32

    def _autocast(self):
        """The autocast context of a mixed precision (none otherwise)."""
        half, mixed = PRECISIONS.get(self.precision, (None, False))
        return torch.autocast(self.device.type, dtype=half) if mixed else nullcontext()

    # ---------------------------------------------------------------- sizes
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def frame_window(self) -> int:
        """Spectrogram frames per encoder window: the positional table (250 tokens: 1000 frames, 10 s)."""
        return self.config.encoder.max_tokens * self.config.encoder.patch_frames

    @property
    def clip_chunk(self) -> int:
        """ATST-Clip clip-embedding chunk: 601 frames (6 s) as the reference, or the window if shorter."""
        return min(self.reference_clip_chunk, self.frame_window)

    @property
    def head_spec(self) -> HeadSpec | None:
        """What kind of head the model has (None: none); see :data:`~atst_features.heads.HEADS`."""
        return HEADS[self.config.head_type] if self.head is not None else None

    def require_head(self, level: str, name: str | None = None) -> HeadSpec:
        """The model's head spec if it has a head of ``level`` (``"clip"``: tagging, ``"frame"``: event
        detection), else :class:`InputError` naming the model (``name``) and how to get such a head."""
        wanted = next((spec for spec in HEADS.values() if spec.level == level), None)
        if wanted is None:
            raise InputError(f"level must be one of {sorted({spec.level for spec in HEADS.values()})}, got {level!r}")
        spec = self.head_spec
        if spec is None or spec.level != level:
            raise InputError(f"{name or f'this {self.kind} model'} has no {wanted.title}; {wanted.how_to_get}")
        return spec

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the tagging head's classes, in logit order (empty without a head): those saved
        with a fine-tuned model, AudioSet's for a 527-class C2F head, else ``class_0`` ..."""
        if self.config.labels:
            return self.config.labels
        return default_labels(self.config.num_classes, audioset=self.kind == "c2f")

    @property
    def min_samples(self) -> int:
        """Shortest input at 16 kHz, to which shorter audio is zero-padded: what the front end's
        centred STFT accepts (513 samples for the official models) and at least one token."""
        patch, hop = self.config.encoder.patch_frames, self.config.frontend.hop_length
        return max(self.frontend.min_samples, (patch - 1) * hop)

    @property
    def window_samples(self) -> int:
        """Samples in one encoder window (:attr:`frame_window` frames: 160 000, 10 s, for the official models)."""
        return self.frame_window * self.config.frontend.hop_length

    @property
    def embed_dim(self) -> int:
        return self.config.encoder.embed_dim

    @property
    def depth(self) -> int:
        return self.config.encoder.depth

    @property
    def frame_hop_ms(self) -> int:
        """Spacing of frame embeddings in milliseconds (one token = 4 spectrogram frames of 10 ms)."""
        return self._frame_ms * self.config.encoder.patch_frames

    @property
    def _frame_ms(self) -> int:
        return 1000 * self.config.frontend.hop_length // self.config.frontend.sample_rate

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    def frame_embedding_size(self, n_blocks: int | None = None) -> int:
        """Size of one frame embedding: ``n_blocks * embed_dim``."""
        return self.config.encoder.frame_embedding_size(self._check_n_blocks(n_blocks))

    def clip_embedding_size(self, n_blocks: int | None = None) -> int:
        """Size of the clip embedding: ``2 * n_blocks * D`` for ATST-Clip (CLS and token mean) and
        for ATST-Frame with prompt tokens (token mean and prompt mean), else ``n_blocks * D``."""
        return self.config.encoder.clip_embedding_size(self._check_n_blocks(n_blocks))

    def _check_n_blocks(self, n_blocks: int | None) -> int:
        """``n_blocks`` validated; None means every block of the model (12 for the paper's models)."""
        if n_blocks is None:
            return self.depth
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks <= self.depth:
            raise InputError(f"n_blocks must be an integer in 1..{self.depth}, got {n_blocks!r}")
        return n_blocks

    # ---------------------------------------------------------------- public API
    def get_frame_embeddings(
        self, audio, *, sample_rate: int | None = None, n_blocks: int | None = None, batch_size: int = 32
    ) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Frame embeddings, one per 40 ms, and their timestamps (token centres, ``40 * i + 15`` ms).

        Returns ``(embeddings [B, T, n_blocks * D], timestamps [B, T])`` for a tensor/array/path,
        or per-item lists ``[T_i, n_blocks * D]`` and ``[T_i]`` for a list input, with
        ``T = (1 + N // 160) // 4`` tokens for ``N`` samples at 16 kHz (at least 1): every timestamp
        lies inside the audio. ``batch_size``: 10 s windows per encoder pass.
        """
        n_blocks = self._check_n_blocks(n_blocks)
        waves, is_list = self._prepare(audio, sample_rate)
        with self._inference():
            frames, timestamps, _ = self._frames(waves, is_list, n_blocks, batch_size, pooling=None)
        return frames, timestamps

    def get_embeddings(
        self, audio, *, sample_rate: int | None = None, n_blocks: int | None = None, batch_size: int = 32
    ) -> tuple[Tensor, Tensor | list[Tensor], Tensor | list[Tensor]]:
        """``(clip, frames, timestamps)``: :meth:`get_clip_embedding` and :meth:`get_frame_embeddings`
        together. ATST-Frame / C2F compute both in one encoder pass; ATST-Clip runs its 6 s chunk
        pass for the clip embedding as well."""
        n_blocks = self._check_n_blocks(n_blocks)
        waves, is_list = self._prepare(audio, sample_rate)
        with self._inference():
            pooling = None if self.config.encoder.cls_token else self._new_frame_pooling(len(waves), n_blocks)
            frames, timestamps, clip = self._frames(waves, is_list, n_blocks, batch_size, pooling)
            if clip is None:
                clip = self._clip_pooling(waves, n_blocks, batch_size)
        return clip.to(self.output_dtype), frames, timestamps

    def iter_frame_embeddings(
        self, audio, *, sample_rate: int | None = None, n_blocks: int | None = None, batch_size: int = 32
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Frame embeddings of one clip, in time order, ``batch_size`` windows (10 s each) at a time.

        Yields ``(first_index, embeddings [k, n_blocks * D], timestamps [k])``, one piece per batch of
        windows: for hour-long audio, write each piece out instead of holding ``[T, n_blocks * D]``.
        """
        n_blocks = self._check_n_blocks(n_blocks)
        waves, is_list = self._prepare(audio, sample_rate)
        if is_list or len(waves) != 1:
            raise InputError("iter_frame_embeddings takes one clip: [N], [1, N] or a path")
        patch = self.config.encoder.patch_frames
        batches = self._run_windows(waves, self.frame_window, n_blocks, batch_size, streaming=True)
        while True:
            # Inference and eval mode only while computing, never while suspended at a yield.
            with self._inference():
                try:
                    windows, n_tokens, out = next(batches)
                except StopIteration:
                    return
                # One clip: the batch's windows are consecutive in time, so they fill one piece.
                first, count = windows[0].first_frame // patch, sum(n_tokens)
                piece = torch.empty(count, self.frame_embedding_size(n_blocks), dtype=self.output_dtype, device=self.device)
                self._write_frames(out, n_tokens, [piece] * len(windows), [w.first_frame // patch - first for w in windows])
            yield first, piece, self._timestamps(first + count)[first:]

    def get_clip_embedding(
        self, audio, *, sample_rate: int | None = None, n_blocks: int | None = None, batch_size: int = 32
    ) -> Tensor:
        """One embedding per clip, ``[B, clip_embedding_size(n_blocks)]``.

        ATST-Frame / C2F: per block (shallow to deep), the mean of the frame tokens over the whole
        clip, followed by the mean raw prompt output when the model has prompts. ATST-Clip: the CLS
        outputs of the last ``n_blocks`` blocks, then their token means, averaged over 6 s chunks
        (a chunk after the first counts when it holds more than 3 s).
        """
        n_blocks = self._check_n_blocks(n_blocks)
        waves, _ = self._prepare(audio, sample_rate)
        with self._inference():
            if self.config.encoder.cls_token:
                embedding = self._clip_pooling(waves, n_blocks, batch_size)
            else:
                embedding = self._frame_pooling(waves, n_blocks, batch_size)
        return embedding.to(self.output_dtype)

    def get_tag_logits(self, audio, *, sample_rate: int | None = None, batch_size: int = 32, span: str = "all") -> Tensor:
        """Tagging logits ``[B, num_classes]``, in the order of :attr:`labels`: the head on the last
        block's clip embedding of the whole clip (so, for long audio, the token-weighted mean of
        per-window logits for ATST-Frame / C2F), or with ``span="reference"`` of the part the
        authors' fine-tuning code scores (the central 12 s; see :mod:`atst_features.tagging`).
        Probabilities: :meth:`get_tag_probabilities`."""
        from .tagging import clip_embedding_for_tagging

        if self.head_spec is not None and self.head_spec.level == "frame":
            raise InputError("an event-detection head gives probabilities, not logits: use get_tag_probabilities "
                             "(clip level) or get_event_probabilities (per 40 ms)")
        self.require_head("clip")
        waves, _ = self._prepare(audio, sample_rate)
        with self._inference():
            return self.head(clip_embedding_for_tagging(self, waves, span, batch_size).to(self.output_dtype))

    def get_tag_probabilities(self, audio, *, sample_rate: int | None = None, batch_size: int = 32,
                              span: str = "all") -> Tensor:
        """Clip-level class probabilities ``[B, num_classes]``: :meth:`get_tag_logits` through a
        sigmoid (multi-label heads, C2F's) or a softmax (single-label); for an event head, its weak
        (attention-pooled) output over the whole clip."""
        if self.head_spec is not None and self.head_spec.level == "frame":
            if span != "all":
                raise InputError(f"span={span!r:.20} is for tagging heads; an event head pools the whole clip")
            return torch.stack(self.get_event_probabilities(audio, sample_rate=sample_rate, batch_size=batch_size)[2])
        logits = self.get_tag_logits(audio, sample_rate=sample_rate, batch_size=batch_size, span=span).float()
        return logits.sigmoid() if self.config.multi_label else logits.softmax(dim=-1)

    def get_event_probabilities(
        self, audio, *, sample_rate: int | None = None, hop_seconds: float | None = None, batch_size: int = 32
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Sound event probabilities of a model with a frame-level head, per clip: ``(strong [T_i, C]
        per output frame (a 40 ms token; ATST-SED: 64 ms), timestamps [T_i] in ms (frame centres),
        weak [C])``, float32.

        Audio longer than 10 s runs in 10 s windows every ``hop_seconds`` (a multiple of 40 ms, at
        most 10 s; default: the model's, else 5), cut from its spectrogram or from the audio as the
        model's ``config.detection["windows"]`` says (see :mod:`atst_features.detection`); where
        windows overlap, token probabilities (and attention weights) are averaged. The weak output
        pools the whole clip as the head does (attention, or the highest frame).
        """
        from .detection import event_probabilities, timestamps

        self.require_head("frame")
        waves, _ = self._prepare(audio, sample_rate)
        strong, weak = event_probabilities(self, waves, hop_seconds, batch_size)
        return strong, [timestamps(self, len(p)) for p in strong], weak

    def detect_events(self, audio, *, sample_rate: int | None = None, threshold=None, median=None, combine: str | None = None,
                      min_gap: float = 0.0, min_length: float = 0.0, hop_seconds: float | None = None,
                      batch_size: int = 32) -> list[list]:
        """Sound events per clip (:class:`~atst_features.events.Event`: onset and offset in seconds,
        label, score), sorted by onset: :meth:`get_event_probabilities`, median-filtered (``median``
        frames, one value or ``{label: value}``), at or above ``threshold``, overlapping windows
        combined by ``"average"`` or ``"union"``; each left None takes the model's own setting
        (``config.detection``; :mod:`atst_features.detection`), else 7 frames, 0.5 and average.
        ``min_gap`` / ``min_length`` (s): merge closer events of a class, drop shorter ones."""
        from .detection import detect_events

        return detect_events(self, audio, sample_rate=sample_rate, hop_seconds=hop_seconds, threshold=threshold,
                             median=median, combine=combine, min_gap=min_gap, min_length=min_length,
                             batch_size=batch_size)[0]

    # ---------------------------------------------------------------- internals
    def _prepare(self, audio, sample_rate: int | None) -> tuple[list[Tensor], bool]:
        """Validated 16 kHz waveforms on the model's device, zero-padded to the front end's minimum. To a GPU,
        waveforms in host memory go together in one copy from pinned memory that does not wait for the device
        (``non_blocking``): one transfer per call, not one per waveform, and the host goes on meanwhile."""
        waves, is_list = to_waveforms(audio, sample_rate, self.sample_rate)
        minimum = self.min_samples
        waves = [
            nn.functional.pad(w, (0, minimum - w.numel())) if w.numel() < minimum else w for w in waves
        ]
        if self.device.type == "cuda" and all(w.device.type == "cpu" for w in waves):
            pinned = torch.empty(sum(w.numel() for w in waves), dtype=torch.float32, pin_memory=True)
            torch.cat(waves, out=pinned)
            return list(pinned.to(self.device, non_blocking=True).split([w.numel() for w in waves])), is_list
        return [w.to(self.device, torch.float32) for w in waves], is_list

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and ``torch.inference_mode()`` for the duration of a call; restores the mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def num_frame_embeddings(self, n_samples: int) -> int:
        """How many frame embeddings ``n_samples`` samples at 16 kHz give: ``(1 + N // 160) // 4``,
        at least 1 (short audio is padded to the front end's minimum)."""
        samples = max(int(n_samples), self.min_samples)
        return int(self.frontend.n_frames(samples)) // self.config.encoder.patch_frames

    def num_windows(self, n_samples: int) -> int:
        """Encoder windows of :attr:`frame_window` frames that a clip of ``n_samples`` samples at 16 kHz takes."""
        frames = int(self.frontend.n_frames(max(int(n_samples), self.min_samples)))
        return len(plan_windows(frames, self.frame_window, self.frame_window, self.config.encoder.patch_frames))

    def _write_frames(self, out: EncoderOutput, n_tokens: list[int], targets: list[Tensor], rows: list[int]) -> None:
        """Write window ``w``'s first ``n_tokens[w]`` tokens into ``targets[w] [R, n_blocks * D]`` from
        row ``rows[w]`` on: blocks side by side, shallow to deep.

        See :func:`_gathers_frames`; when gathering, all windows share one target.
        """
        dim, target = self.embed_dim, targets[0]
        if not _gathers_frames(target.device):
            # One concatenation of the blocks per run of windows (see _runs), as the official code's torch.cat:
            # a copy per window and block (96 for 8 windows of 12 blocks) starts a parallel region each, and
            # each waits while another process holds a core (0.4-0.75 s on a loaded 2-core machine, one cat 0.1 s).
            for start, end in _runs(targets, rows, n_tokens):
                count = n_tokens[start]
                run = targets[start][rows[start] : rows[start] + (end - start) * count].view(end - start, count, -1)
                torch.cat([tokens[start:end, :count] for tokens in out.tokens], dim=-1, out=run)
            return
        assert all(other is target for other in targets), "the device path writes into one target"
        counts = torch.tensor(n_tokens)
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        source = torch.repeat_interleave(torch.arange(len(counts)) * out.tokens[0].shape[1], counts) + within
        destination = torch.repeat_interleave(torch.tensor(rows), counts) + within
        source, destination = torch.stack([source, destination]).to(target.device)
        for block, tokens in enumerate(out.tokens):
            values = tokens.flatten(0, 1).index_select(0, source).to(target.dtype)
            target[:, block * dim : (block + 1) * dim].index_copy_(0, destination, values)

    def _timestamps(self, count: int) -> Tensor:
        # Token i covers frames 4i..4i+3, centred at 10 * (4i + 1.5) ms = 40i + 15 ms.
        centre = self._frame_ms * (self.config.encoder.patch_frames - 1) / 2
        return torch.arange(count, device=self.device, dtype=torch.float32) * self.frame_hop_ms + centre

    def _run_windows(
        self, waves: list[Tensor], width: int, n_blocks: int, batch_size: int, later_min_frames: int = 0,
        hop: int | None = None, streaming: bool = False,
    ) -> Iterator[tuple[list[Window], list[int], EncoderOutput]]:
        """Encode every item in windows of ``width`` frames, one every ``hop`` frames (default
        ``width``: no overlap); yield ``(windows, n_tokens, output)`` per encoder pass.

        Windows as :func:`~atst_features.windows.plan_windows` plans them. Items are processed longest
        first in groups of about ``batch_size`` windows, so the front end pads little and memory stays
        bounded. The windows run longest first in encoder passes of ``batch_size``, which a CPU ends
        early so as to pad little (:func:`~atst_features.windows.encoder_passes`). A NaN or Inf in any
        output raises :class:`NonFiniteError` once every window has run, so no caller returns it.
        ``streaming`` (one clip, yielded as it goes): one pass per batch, and the check runs before
        the pass that holds it is yielded.
        """
        hop = hop or width
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        patch = self.config.encoder.patch_frames
        order = sorted(range(len(waves)), key=lambda i: -waves[i].numel())
        check = FiniteCheck()
        for group in self._groups(order, waves, hop, batch_size):
            lengths = [waves[i].numel() for i in group]
            if len(group) == 1:  # no padded copy of a long single input
                padded = waves[group[0]][None]
            elif min(lengths) == max(lengths):
                padded = torch.stack([waves[i] for i in group])
            else:
                padded = nn.utils.rnn.pad_sequence([waves[i] for i in group], batch_first=True)
            mel, _ = self.frontend(padded, torch.tensor(lengths))  # lengths on the CPU: no device sync
            windows = [(row, Window(item, first, frames)) for row, item in enumerate(group)
                       for first, frames in plan_windows(self.frontend.n_frames(lengths[row]), width, hop, patch,
                                                         later_min_frames)]
            windows.sort(key=lambda entry: -entry[1].n_frames)
            for batch in encoder_passes(windows, batch_size, pad=streaming or self.device.type != "cpu"):
                stacked = stack_windows(mel, batch)
                n_tokens = [window.n_frames // patch for _, window in batch]
                padded_keys = min(n_tokens) < stacked.shape[-1] // patch
                token_counts = torch.tensor(n_tokens).to(self.device) if padded_keys else None
                with self._autocast():
                    output = self.encoder(stacked.to(self.dtype), token_counts, n_blocks)
                check.add([window for _, window in batch], output)
                if streaming:
                    check.refuse(len(waves), self._computes_in_float16)
                yield [window for _, window in batch], n_tokens, output
        check.refuse(len(waves), self._computes_in_float16)

    @property
    def _computes_in_float16(self) -> bool:
        return self.dtype == torch.float16 or (self.precision or "").startswith("fp16")

    def _groups(self, order: list[int], waves: list[Tensor], width: int, batch_size: int) -> Iterator[list[int]]:
        """Consecutive items of ``order`` whose windows add up to about ``batch_size`` (at least one item)."""
        group, windows = [], 0
        for item in order:
            needed = -(-int(self.frontend.n_frames(waves[item].numel())) // width)
            if group and windows + needed > batch_size:
                yield group
                group, windows = [], 0
            group.append(item)
            windows += needed
        if group:
            yield group

    def _frame_pooling(self, waves: list[Tensor], n_blocks: int, batch_size: int, later_min_frames: int = 0) -> Tensor:
        """ATST-Frame / C2F clip embedding: token-weighted means over the windows of each item (all of
        them, or the first and those with more than ``later_min_frames`` frames)."""
        pooling = self._new_frame_pooling(len(waves), n_blocks)
        for windows, n_tokens, out in self._run_windows(waves, self.frame_window, n_blocks, batch_size,
                                                        later_min_frames=later_min_frames):
            pooling.add(windows, n_tokens, out)
        return pooling.result()

    def _frames(
        self, waves: list[Tensor], is_list: bool, n_blocks: int, batch_size: int, pooling: FramePooling | None
    ):
        """Frame embeddings and timestamps (lists for a list input, else batch tensors); with
        ``pooling``, also the ATST-Frame clip embedding from the same windows."""
        counts = [self.num_frame_embeddings(wave.numel()) for wave in waves]
        size, patch = self.frame_embedding_size(n_blocks), self.config.encoder.patch_frames
        empty = partial(torch.empty, dtype=self.output_dtype, device=self.device)
        if is_list and not _gathers_frames(self.device):  # one tensor per item, written window by window
            outputs, offsets = [empty(count, size) for count in counts], [0] * len(counts)
        else:  # all items in one [sum(counts), size] tensor (the device path gathers into one target)
            frames = empty(sum(counts), size)
            outputs, offsets = [frames] * len(counts), [0]
            for count in counts[:-1]:
                offsets.append(offsets[-1] + count)
        for windows, n_tokens, out in self._run_windows(waves, self.frame_window, n_blocks, batch_size):
            targets = [outputs[w.item] for w in windows]
            self._write_frames(out, n_tokens, targets, [offsets[w.item] + w.first_frame // patch for w in windows])
            if pooling is not None:
                pooling.add(windows, n_tokens, out)
        timestamps = [self._timestamps(count) for count in counts]
        clip = pooling.result() if pooling is not None else None
        if not is_list:
            return frames.view(len(waves), counts[0], size), torch.stack(timestamps), clip
        if _gathers_frames(self.device):  # own storage per item: torch.save of one must not write all
            outputs = [piece.clone() for piece in frames.split(counts)]
        return outputs, timestamps, clip

    def _clip_pooling(self, waves: list[Tensor], n_blocks: int, batch_size: int) -> Tensor:
        """ATST-Clip clip embedding: CLS and token means of each 6 s chunk, averaged over the chunks
        that count (the first one, and later ones holding more than half a chunk)."""
        pooling = ChunkPooling(len(waves), n_blocks, self.embed_dim, self.device)
        for windows, n_tokens, out in self._run_windows(
            waves, self.clip_chunk, n_blocks, batch_size, later_min_frames=self.clip_chunk // 2
        ):
            pooling.add(windows, n_tokens, out)
        return pooling.result()

    def _new_frame_pooling(self, items: int, n_blocks: int) -> FramePooling:
        return FramePooling(items, n_blocks, self.embed_dim, bool(self.config.encoder.n_prompts), self.device)
