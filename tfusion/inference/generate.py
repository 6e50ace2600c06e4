"""The interleaved text-and-image generation loop (host side).

Each row is in its own state:
  text:  feed the row's last token, sample the next (BOI -> image, EOS -> done);
  image: denoise P noise patches against the cached prefix for `steps` steps
         (any prediction and process: inference/diffusion_samplers.py),
         write the clean image (t = 0) into the cache, then feed EOI;
         the discrete (Chameleon) baseline instead samples its image_tokens VQ codes
         one by one, restricted to the codebook's ids, then feeds EOI.
Whenever some row needs an image, all rows pause for one image phase, so every
jitted call has static shapes. Each row writes at its own cache index (cache.py):
a row sitting out a call writes dead columns beyond its frontier and stays where
it is, so a row's cache is exactly its sequence, with no gaps inside a document.

With CFG (options.cfg_scale not None) every row r has a twin r + B: the
unconditional stream. It writes nothing during text; at each image it starts a
fresh document `BOS BOI` at its own frontier (what caption dropout trains on) and
denoises the same x; the guided epsilon drives both (the discrete baseline: the
guided logits pick each code, fed to both). Given `uncond_prompts` (ending in BOI),
a twin is prefilled with its own prompt instead, and its first image continues that
prompt: e.g. editing guides on the instruction alone with the twin
`BOS BOI <input> EOI BOI` against the row's `BOS BOI <input> EOI instruction BOI`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from tfusion.batch import ImageSegment
from tfusion.inference import diffusion_samplers as samplers
from tfusion.inference.engine import Engine
from tfusion.inference.options import GenerationOptions, SpecialTokens
from tfusion.inference.prompts import as_document, codes_as_tokens, layout_prompts
from tfusion.inference.steps import CacheColumns


@dataclasses.dataclass
class Generation:
    """What one row produced after its prompt: token arrays and latents [H, W, C] (the
    discrete baseline: int32 VQ codes [h, w, 1]), in sequence order, e.g.
    [array([.., BOI]), latent, array([EOI, .., EOS])]."""

    segments: list

    @property
    def images(self) -> list[np.ndarray]:
        return [s for s in self.segments if s.ndim == 3]

    @property
    def tokens(self) -> np.ndarray:
        text = [s for s in self.segments if s.ndim == 1]
        return np.concatenate(text) if text else np.zeros((0,), np.int32)


class _Rows:
    """Host mirror of per-row decoding state (R = B or 2B rows)."""

    def __init__(self, batch: int, guided: bool, lengths: np.ndarray, last_tokens,
                 image_limit: np.ndarray, image_columns: int):
        rows = 2 * batch if guided else batch
        self.b, self.guided, self.p = batch, guided, image_columns
        self.pos = np.zeros(rows, np.int32)  # RoPE position in the row's document
        self.pos[:batch] = lengths
        self.seg = np.zeros(rows, np.int32)  # the row's current document (twins: none yet)
        self.seg[:batch] = 1
        self.col = np.zeros(rows, np.int32)  # cache frontier (host copy of cache.index)
        self.draws = np.zeros(rows, np.int32)  # text draws so far (key counters)
        self.n_sampled = np.zeros(batch, np.int32)  # tokens taken (max_new_tokens)
        self.images = np.zeros(rows, np.int32)  # images so far (key counters)
        self.image_limit = np.concatenate([image_limit] * (rows // batch))
        # Twins whose own prompt ends in BOI: their next image continues it.
        self.twin_open = np.zeros(rows, bool)
        self.sampled = np.zeros(batch, np.int32)
        self.last_fed = np.asarray(last_tokens, np.int32)
        self.needs_image = np.zeros(batch, bool)
        self.done = np.zeros(batch, bool)
        self.out: list[list] = [[] for _ in range(batch)]
        self.text: list[list[int]] = [[] for _ in range(batch)]

    def twin(self, cond: np.ndarray) -> np.ndarray:
        """Row mask over R rows: `cond` [B] plus, with CFG, the same rows' twins."""
        return np.concatenate([cond, cond]) if self.guided else cond

    def cond_only(self, cond: np.ndarray) -> np.ndarray:
        """Row mask over R rows: `cond` [B], twins never."""
        return np.concatenate([cond, np.zeros_like(cond)]) if self.guided else cond

    def image_room(self, max_len: int, extra: np.ndarray | int = 0) -> np.ndarray:
        """bool [B]: a row (and its twin) can still hold an image after `extra` more
        columns of its own: the row needs P + 1 columns (image, EOI), the twin
        2 + P (BOS BOI image)."""
        cond = self.col[:self.b] + extra + self.p + 1 <= max_len
        if self.guided:
            cond &= self.col[self.b:] + 2 + self.p <= max_len
        return cond

    def flush_text(self, r: int):
        if self.text[r]:
            self.out[r].append(np.asarray(self.text[r], np.int32))
            self.text[r] = []


def default_max_len(prompt_len: int, options: GenerationOptions, p: int,
                    prompt_images: int) -> int:
    """The longest row: its prompt, every sampled token fed back (BOIs included), and
    each image's P columns plus its EOI; a CFG twin (BOS BOI and P per image) is never
    longer, as every image but a prompt's BOI one costs a sampled BOI. Rows sitting
    out a call take no columns. Rounded up to a multiple of 64 so prompts of similar
    length share compiled steps."""
    images = options.max_images + (1 if prompt_images else 0)
    need = prompt_len + options.max_new_tokens + images * (p + 1) + 1
    return -(-need // 64) * 64


def generate(engine: Engine, prompts: Sequence, special: SpecialTokens,
             options: GenerationOptions, seeds: Sequence[int], progress=None,
             uncond_prompts: Sequence | None = None) -> list[Generation]:
    """Continues each prompt (a document: token arrays and clean latents).

    A prompt ending in BOI starts with an image; one ending in an image gets EOI
    appended. `seeds` (one per prompt) make every row reproducible on its own,
    whatever it is batched with. `progress(num_steps)` may return a tqdm-like bar
    updated once per diffusion step. `uncond_prompts` (one per prompt, each ending in
    BOI, with CFG only): what each row's first image is guided against, instead of
    a bare `BOS BOI`.
    """
    engine.check_sampler(options.sampler, options.spacing)
    docs = [as_document(p) for p in prompts]
    docs = [d + [np.asarray([special.eoi], np.int32)] if isinstance(d[-1], ImageSegment)
            else d for d in docs]
    if len(seeds) != len(docs):
        raise ValueError(f"{len(seeds)} seeds for {len(docs)} prompts")
    if engine.discrete:
        docs = [codes_as_tokens(d, engine.code_offset) for d in docs]
    b, p = len(docs), engine.image_columns
    ends_boi = np.asarray([int(d[-1][-1]) == special.boi for d in docs])
    guided = options.cfg_scale is not None and (options.max_images > 0 or ends_boi.any())
    twins = []
    if uncond_prompts is not None:
        twins = [as_document(u) for u in uncond_prompts]
        if not guided or len(twins) != b or engine.discrete:
            raise ValueError("uncond_prompts: one per prompt, with CFG (cfg_scale) and "
                             "continuous images")
        if not all(isinstance(u[-1], np.ndarray) and int(u[-1][-1]) == special.boi
                   for u in twins):
            raise ValueError("uncond_prompts must each end in BOI")
    lay = layout_prompts(docs + twins, engine.latent_shape, engine.cfg.patch_size, special.pad)
    max_len = options.max_len or default_max_len(
        lay["tokens"].shape[1], options, p, int(ends_boi.sum()))
    last_tokens = lay["tokens"][np.arange(b), lay["lengths"][:b] - 1]
    rows = _Rows(b, guided, lay["lengths"][:b], last_tokens, options.max_images + ends_boi, p)
    if twins:
        rows.pos[b:], rows.seg[b:], rows.twin_open[b:] = lay["lengths"][b:], 1, True
    keys = engine.keys(list(seeds) * (2 if guided else 1))
    run = _Loop(engine, special, options, rows, keys, max_len)
    run.prefill(lay)
    while True:
        if (rows.needs_image & ~rows.done).any():
            run.image_phase(progress)
        elif not rows.done.all():
            run.text_step()
        else:
            break
    for r in range(b):
        rows.flush_text(r)
    return [Generation(segments) for segments in rows.out]


def _device(block: CacheColumns) -> CacheColumns:
    return CacheColumns(*(jnp.asarray(a, jnp.int32) for a in
                          (block.positions, block.segment_ids, block.slot)))


def _live_columns(block: CacheColumns) -> np.ndarray:
    """Columns each row commits from a host block (what KVCache.commit counts)."""
    return (np.asarray(block.segment_ids) != 0).sum(axis=1).astype(np.int32)


class _Loop:
    def __init__(self, engine, special, options, rows: _Rows, keys, max_len: int):
        self.engine, self.special, self.options, self.rows = engine, special, options, rows
        self.keys, self.max_len = keys, max_len
        self.n = len(rows.pos)
        self.cache = engine.new_cache(self.n, max_len)
        self.schedule = engine.schedule(options.steps, options.spacing)
        self.logits = None  # [R, V] at each row's last column, from the last text feed

    def _block(self, live: np.ndarray, width: int, image: bool = False) -> CacheColumns:
        """Host block of `width` columns: live rows continue their document (an image's
        id is the row's frontier, the column of its first patch); others are dead."""
        r = self.rows
        positions = np.where(live[:, None], r.pos[:, None] + np.arange(width), 0)
        segments = np.where(live[:, None], r.seg[:, None], 0).repeat(width, axis=1)
        slots = np.where(live & image, r.col, -1)[:, None].repeat(width, axis=1)
        return CacheColumns(*(a.astype(np.int32) for a in (positions, segments, slots)))

    def _banned(self, new_columns: np.ndarray) -> jnp.ndarray:
        """Ids a row may not sample after committing `new_columns` [R] more columns."""
        s, r = self.special, self.rows
        banned = np.zeros((self.n, self.engine.cfg.vocab_size), bool)
        banned[:, [s.pad, s.bos, s.eoi]] = True  # EOI is appended, never sampled
        room = r.image_room(self.max_len, new_columns[:r.b] + 1)  # + the BOI itself
        banned[:, s.boi] = ~r.twin((r.images[:r.b] < r.image_limit[:r.b]) & room)
        return jnp.asarray(banned)

    def _feed(self, tokens, block: CacheColumns, live: np.ndarray, image_index=None, images=None):
        """Writes a block of tokens, samples every live row's next token."""
        o, r = self.options, self.rows
        new_columns = _live_columns(block)
        nxt, self.logits, self.cache = self.engine.text_step(
            self.cache, jnp.asarray(tokens), _device(block), self.keys, jnp.asarray(r.draws),
            self._banned(new_columns), o.temperature, o.top_p, image_index, images,
            top_k=o.top_k)
        r.col += new_columns
        self._accept(np.asarray(nxt)[:r.b], live)
        r.draws[:r.b] += live

    def prefill(self, lay):
        r = self.rows
        pad_rows = self.n - len(lay["lengths"])  # twins without a prompt write nothing yet
        extend = lambda a, v: np.concatenate([a, np.full((pad_rows,) + a.shape[1:], v, a.dtype)])
        block = CacheColumns(*(extend(lay[k], v) for k, v in
                               (("positions", 0), ("segment_ids", 0), ("slot", -1))))
        images = None
        if lay["images"].shape[1]:
            images = jnp.asarray(extend(lay["images"], 0.0))
        self._feed(extend(lay["tokens"], self.special.pad), block, np.ones(r.b, bool),
                   jnp.asarray(extend(lay["image_index"], -1)), images)

    def _accept(self, sampled: np.ndarray, live: np.ndarray):
        """Per live row: the fed token was BOI -> image next; else take the sample."""
        r, s, o = self.rows, self.special, self.options
        for i in np.flatnonzero(live):
            if r.last_fed[i] == s.boi:
                r.needs_image[i] = True
                continue
            if r.n_sampled[i] >= o.max_new_tokens:
                r.done[i] = True
                continue
            tok = int(sampled[i])
            r.text[i].append(tok)
            r.sampled[i] = tok
            r.n_sampled[i] += 1
            if tok == s.eos:
                r.done[i] = True

    def text_step(self):
        r = self.rows
        live = ~r.done & ~r.needs_image
        full = live & (r.col[:r.b] + 1 > self.max_len)  # no room to feed: stop these rows
        r.done |= full
        live &= ~full
        if not live.any():
            return
        tokens = np.full((self.n, 1), self.special.pad, np.int32)
        tokens[:r.b, 0] = np.where(live, r.sampled, self.special.pad)
        r.last_fed = np.where(live, r.sampled, r.last_fed)
        self._feed(tokens, self._block(r.cond_only(live), 1), live)
        r.pos[:r.b] += live

    def _denoise(self, x, counters, block: CacheColumns, bar):
        """All K sampling steps of one image phase, in chunks of options.steps_per_call
        compiled steps (one program per chunk); the progress bar moves per chunk.
        Steps outside the guidance interval run the conditional rows alone (their own
        chunks). Returns the clean x; self.cache ends holding the last guided step's
        image columns (commit_image rewrites them)."""
        r, e, o = self.rows, self.engine, self.options
        k = self.schedule.num_steps
        per_call = o.steps_per_call or (max(1, -(-k // 10)) if bar is not None else k)
        step_options = dict(sampler=o.sampler, guided=r.guided, prediction=e.process.prediction,
                            process=e.process.process, clip=o.clip_denoised)
        common = (self.keys[:r.b], counters, block, self.schedule,
                  jnp.float32(o.cfg_scale or 1.0))
        guided = (samplers.guided_steps(self.schedule, o.cfg_interval) if r.guided
                  else np.zeros(k, bool))
        state = samplers.SamplerState.start(x)
        first = k - 1
        while first >= 0:
            run = 1  # steps first, first - 1, ..., first - run + 1 share their guidance
            while first - run >= 0 and guided[first - run] == guided[first]:
                run += 1
            count = min(per_call, run)
            skip_twin = r.guided and not guided[first]
            if per_call == 1 and not skip_twin:
                state, self.cache = e.diffusion_step(self.cache, state, jnp.int32(first),
                                                     *common, **step_options)
            else:
                state, self.cache = e.diffusion_steps(
                    self.cache, state, jnp.int32(first), jnp.int32(count), *common,
                    skip_twin=skip_twin, **step_options)
            first -= count
            if bar is not None:
                bar.update(count)
        return state.x

    def image_phase(self, progress):
        r, e = self.rows, self.engine
        live = r.needs_image & ~r.done
        full = live & ~r.image_room(self.max_len)  # no room: stop these rows
        r.done |= full
        live &= ~full
        if not live.any():
            return
        both = r.twin(live)
        # A fresh unconditional document per image at the twin's frontier (not for a
        # twin whose own prompt is open: its image continues it).
        uncond = both & (np.arange(self.n) >= r.b) & ~r.twin_open
        if r.guided and uncond.any():
            r.seg[uncond] += 1
            r.pos[uncond] = 0
            tokens = np.full((self.n, 2), self.special.pad, np.int32)
            tokens[uncond] = (self.special.bos, self.special.boi)
            block = self._block(uncond, 2)
            twin_logits, self.cache = e.prefill(self.cache, jnp.asarray(tokens), _device(block))
            self.logits = jnp.where(jnp.asarray(uncond)[:, None], twin_logits, self.logits)
            r.col += _live_columns(block)
            r.pos[uncond] = 2
        x = self._code_image(both) if e.discrete else self._denoised_image(both, progress)
        for i in np.flatnonzero(live):
            r.flush_text(i)
            r.out[i].append(x[i])
            r.needs_image[i] = False
            r.sampled[i] = self.special.eoi  # fed next; EOI is appended, not sampled
            r.text[i].append(self.special.eoi)
        r.images[both] += 1
        r.twin_open[both] = False

    def _denoised_image(self, both: np.ndarray, progress) -> np.ndarray:
        """Transfusion: K diffusion steps of P patches, then the clean image is written
        into the cache. Returns latents [B, H, W, C]."""
        r, e = self.rows, self.engine
        block = self._block(both, e.patches_per_image, image=True)
        device_block = _device(block)
        counters = jnp.asarray(r.images[:r.b])
        x = e.initial_noise(self.keys[:r.b], counters, e.latent_shape)
        bar = progress(self.schedule.num_steps) if progress else None
        x = self._denoise(x, counters, device_block, bar)
        if bar is not None:
            bar.close()
        clean = jnp.concatenate([x, x]) if r.guided else x
        self.cache = e.commit_image(self.cache, clean, device_block)
        r.col += _live_columns(block)
        r.pos += np.where(both, e.patches_per_image, 0).astype(np.int32)
        return np.asarray(x)

    def _code_image(self, both: np.ndarray) -> np.ndarray:
        """The discrete baseline: image_tokens VQ codes, each sampled from the (guided)
        logits and fed to the row and its twin. Returns int32 codes [B, h, w, 1]."""
        r, e, o = self.rows, self.engine, self.options
        tokens = e.cfg.image_tokens
        first_draw = r.images[:r.b] * tokens  # draw numbers of this image's codes
        codes = []
        for k in range(tokens):
            block = self._block(both, 1)
            code, self.logits, self.cache = e.code_step(
                self.cache, self.logits, self.keys[:r.b], jnp.asarray(first_draw + k),
                _device(block), jnp.int32(e.code_offset), jnp.float32(o.cfg_scale or 1.0),
                o.image_temperature, o.top_p, top_k=o.image_top_k, guided=r.guided,
                codebook_size=e.cfg.codebook_size)
            codes.append(code)
            r.col += _live_columns(block)
            r.pos += both.astype(np.int32)
        return np.stack([np.asarray(c) for c in codes], axis=1).reshape((r.b,) + e.code_grid)
