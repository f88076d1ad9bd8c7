"""One streamed step for a fixed batch shape: forward, head, backward, updates.

Order of the weight stream in a training step (each item fetched ``prefetch_depth`` ahead):

    embed, block 0 .. L-1 (forward), head (+ tied wte), block L-1 .. 0 (backward), embed

Layer-major micro-batching: every item runs over all micro-batches before its weights are
dropped, so weights cross the link once per pass, not once per micro-batch. Block inputs are
kept for the backward (on the device, or offloaded to host memory and fetched back with the
block's weights). Gradients go back to the host as each segment's backward finishes; updates
run per segment once the global norm is known (immediately when there is no clipping).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from wsjax.streaming.executables import abstract
from wsjax.streaming.store import segment_names, tree_bytes
from wsjax.streaming.transfer import Fetch, StepStats, WeightStream

if TYPE_CHECKING:
    from wsjax.streaming.engine import StreamingEngine

F32 = jnp.float32


class StepProgram:
    """Executables and the step loop of one engine for one (batch, seq) shape."""

    def __init__(self, engine: StreamingEngine, n_micro: int, micro: int, seq: int, train: bool):
        self.e, self.training = engine, train
        self.n_micro, self.micro, self.seq = n_micro, micro, seq
        model = engine.model
        self.L = model.num_layers
        self.tied = model.tied
        shapes = model.param_shapes()
        layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["blocks"])
        self.master_shapes = {"embed": shapes["embed"], "block": layer, "head": shapes["head"]}
        dt = engine.compute_dtype
        self.w = {k: abstract(v, engine.replicated, dt) for k, v in self.master_shapes.items()}
        self.g = {k: abstract(v, engine.replicated, F32) for k, v in self.master_shapes.items()}
        self.seg_bytes = {k: tree_bytes(v) for k, v in self.w.items()}
        self.wte_bytes = self.seg_bytes["embed"] if self.tied else 0
        d = model.cfg.hidden_size
        self.act = jax.ShapeDtypeStruct((micro, seq, d), dt, sharding=engine.data_sharding)
        self.act_bytes = micro * seq * d * jnp.dtype(dt).itemsize
        self.ids = jax.ShapeDtypeStruct((micro, seq), jnp.int32, sharding=engine.data_sharding)
        self.msk = jax.ShapeDtypeStruct((micro, seq), F32, sharding=engine.data_sharding)
        self.key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=engine.replicated)
        self.idx = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=engine.replicated)
        self.scalar = jax.ShapeDtypeStruct((), F32, sharding=engine.replicated)
        self._kept = None
        self._exes: dict = {}

    # ---- executables ---------------------------------------------------------------------
    def _exe(self, name):
        """The compiled executable ``name`` of this program (built on first use)."""
        exe = self._exes.get(name)
        if exe is None:
            exe = self._exes[name] = self._build(name)
        return exe

    def _build(self, name):
        e, f = self.e, self.e.fns
        rep, dp = e.replicated, e.data_sharding
        wte = self.w["embed"]["wte"] if self.tied else None
        g_wte = self.g["embed"]["wte"] if self.tied else None
        z = lambda tree: jax.tree.map(lambda _: 0, tree)  # output structure, leaves elided
        g_head, g_block, g_embed = z(self.g["head"]), z(self.g["block"]), z(self.g["embed"])
        one = lambda n: jax.tree.structure(0)

        def get(fn, args, out, out_tree, donate=()):
            return e.cache.get(name, fn, args, out_shardings=out, donate=donate, out_tree=out_tree)

        if name in ("embed_fwd", "embed_eval", "block_fwd", "block_eval"):
            fwd = f.embed_fwd if name.startswith("embed") else f.block_fwd
            w, x = (
                (self.w["embed"], self.ids)
                if name.startswith("embed")
                else (self.w["block"], self.act)
            )
            train = name.endswith("_fwd")
            return get(
                lambda w, x, k, i: fwd(w, x, k, i, train), (w, x, self.key, self.idx), dp, one
            )
        if name == "block_fwd_save":
            args = (self.w["block"], self.act, self.key, self.idx)
            # residual layouts left to the compiler (batch-sharded where they carry the batch)
            return get(
                f.block_fwd_save,
                args,
                (dp, None),
                lambda n: jax.tree.structure((0, [0] * (n - 1))),
            )
        if name == "block_bwd_saved":
            self._exe("block_fwd_save")
            if not hasattr(f, "_vjp_layout"):  # the forward came from disk: trace it once
                jax.eval_shape(f.block_fwd_save, self.w["block"], self.act, self.key, self.idx)
            args = (self.w["block"], self.kept, self.act, self.g["block"])
            out_tree = lambda n: jax.tree.structure((0, g_block, 0))
            return get(f.block_bwd_saved, args, (dp, rep, rep), out_tree, donate=(3,))
        if name == "head_train":
            args = (self.w["head"], wte, self.act, self.ids, self.msk, self.scalar)
            args += (self.g["head"], g_wte)
            out_tree = lambda n: jax.tree.structure((0, 0, g_head, 0 if self.tied else None, 0))
            return get(f.head_train, args, (rep, dp, rep, rep, rep), out_tree, donate=(6, 7))
        if name == "head_eval":
            args = (self.w["head"], wte, self.act, self.ids, self.msk)
            return get(f.head_eval, args, (rep, rep, rep), lambda n: jax.tree.structure((0, 0, 0)))
        if name == "block_bwd":
            args = (self.w["block"], self.act, self.act, self.key, self.idx, self.g["block"])
            out_tree = lambda n: jax.tree.structure((0, g_block, 0))
            return get(f.block_bwd, args, (dp, rep, rep), out_tree, donate=(5,))
        if name == "embed_bwd":
            args = (self.w["embed"], self.ids, self.act, self.key, self.idx, self.g["embed"])
            out_tree = lambda n: jax.tree.structure((g_embed, 0))
            return get(f.embed_bwd, args, (rep, rep), out_tree, donate=(5,))
        if name.startswith("update/"):
            return self._update_exe(name.split("/")[1])
        raise KeyError(name)

    def _update_exe(self, kind: str):
        e = self.e
        on_host = e.optimizer_placement == "host"
        where = e.host if on_host else e.replicated
        master = abstract(self.master_shapes[kind], where, F32)
        opt = jax.eval_shape(e.optimizer.init, self.master_shapes[kind])
        opt = abstract(opt, where)
        stream_out = e.stream_sharding if (on_host and e._update_writes_stream) else where
        scalar = jax.ShapeDtypeStruct((), F32, sharding=where)
        z = lambda tree: jax.tree.map(lambda _: 0, tree)
        out_tree = lambda n: jax.tree.structure((z(master), z(opt), z(master)))
        return e.cache.get(
            f"update/{kind}" + ("" if on_host else "@device"),
            e.fns.update,
            (master, opt, master, scalar),
            out_shardings=(where, where, stream_out),
            donate=(0, 1),
            out_tree=out_tree,
        )

    def compile_all(self) -> None:
        """Compile what this program runs: the training step's executables, or evaluation's."""
        for n in self._train_names() if self.training else self._eval_names():
            self._exe(n)

    def _train_names(self) -> list[str]:
        block = (
            ["block_fwd", "block_bwd"]
            if self.e.recompute
            else ["block_fwd_save", "block_bwd_saved"]
        )
        updates = ["update/embed", "update/block", "update/head"]
        return ["embed_fwd", *block, "head_train", "embed_bwd", *updates]

    def _eval_names(self) -> list[str]:
        """Forward-only executables; the training forward serves when it is the same function."""
        plain = self.e.recompute and not self.e.fns.dropout
        suffix = "_fwd" if plain else "_eval"
        return ["embed" + suffix, "block" + suffix, "head_eval"]

    # ---- helpers -------------------------------------------------------------------------
    def _kind(self, name: str) -> str:
        return "block" if name.startswith("block/") else name

    def _fetch(self, name: str, store, ready: bool, extra=None) -> Fetch:
        """Weights of segment ``name`` (+ tied wte for the head, + extra host arrays)."""
        e = self.e
        nbytes = self.seg_bytes[self._kind(name)]

        def issue():
            w = jax.device_put(store.stream[name], e.replicated)
            wte = None
            if name == "head" and self.tied:
                wte = jax.device_put(store.stream["embed"]["wte"], e.replicated)
            more = None
            if extra is not None:  # kept values back from host memory, per micro-batch
                dev = self.kept_shardings()
                more = [jax.device_put(k, dev) for k in extra()]
            return w, wte, more

        if name == "head":
            nbytes += self.wte_bytes
        if extra is not None:  # kept block inputs / residuals coming back from host memory
            nbytes += self.n_micro * self.kept_bytes
        dep = (lambda: store.stream[name]) if ready else None
        return Fetch(name, nbytes, issue, dep)

    def _batch(self, batch: dict, stats: StepStats):
        e, m, n = self.e, self.micro, self.n_micro

        def split(a, dtype):
            a = np.asarray(a, dtype)
            return [jax.device_put(a[i * m : (i + 1) * m], e.data_sharding) for i in range(n)]

        ids = split(batch["input_ids"], np.int32)
        labels = split(batch["labels"], np.int32)
        mask = split(batch["loss_mask"], np.float32)
        stats.h2d_bytes += 3 * n * m * self.seq * 4
        return ids, labels, mask

    @staticmethod
    def _idx(mb: int, seg: int) -> np.ndarray:
        return np.asarray([mb, seg], np.int32)

    # ---- training step -------------------------------------------------------------------
    def train(self, store, batch: dict, step: int) -> dict:
        e, L = self.e, self.L
        run = _Run(self, store, batch, step)
        e.residency.add("activations", 2 * self.n_micro * self.act_bytes)
        x = run.forward()
        loss_sums, dy = run.head(x)
        run.backward(dy)
        e.residency.drop("activations")

        # gradients back: how long the step waits for the last of them to reach the host
        t0 = time.perf_counter()
        jax.block_until_ready(list(run.grads_host.values()))
        run.stats.d2h_wait += time.perf_counter() - t0

        # updates: exact global norm, then per segment in the order the next forward needs them
        g_norm, scale = e.clip_scale(list(run.sqnorms.values()))
        if e.max_norm is not None:
            for name in segment_names(L):
                self._update(store, name, run.grads_host[name], scale, run.stats)
        loss = float(np.sum([np.float64(s) for s in loss_sums])) / run.denom_host
        return {"train/loss": loss, "train/grad_norm": g_norm, **run.stats.as_metrics()}

    def _temp(self, name: str) -> int:
        rec = self.e.cache.record(name)
        return rec.temp_bytes if rec else 0

    @property
    def kept(self):
        """Abstract value kept per block and micro-batch for the backward: its input, or (no
        recompute) its residuals, laid out as the compiled forward emits them."""
        if self._kept is None:
            if self.e.recompute:
                self._kept = self.act
            else:
                fwd = self._exe("block_fwd_save")
                outs, shardings = fwd.out_info[1], fwd.output_shardings[1]
                self._kept = [
                    jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh)
                    for o, sh in zip(outs, shardings, strict=True)
                ]
        return self._kept

    @property
    def kept_bytes(self) -> int:
        return tree_bytes(self.kept)

    def kept_shardings(self, memory_kind: str | None = None):
        """Shardings of the kept value on the device, or in host memory (``memory_kind``)."""
        return (
            jax.tree.map(lambda s: s.sharding.with_memory_kind(memory_kind), self.kept)
            if memory_kind
            else jax.tree.map(lambda s: s.sharding, self.kept)
        )

    def _grads_back(self, store, name, g, sq, grads_host, sqnorms, stats):
        """Send a segment's summed gradients to the host; update now if nothing clips."""
        e = self.e
        sqnorms[name] = sq
        stats.d2h_bytes += tree_bytes(g)
        grads_host[name] = jax.device_put(g, e.host)
        if e.max_norm is None:  # no global norm to wait for: update right away
            self._update(store, name, grads_host[name], 1.0, stats)

    def _update(self, store, name, grads, scale, stats):
        e = self.e
        kind = self._kind(name)
        exe = self._exe(f"update/{kind}")
        if e.optimizer_placement == "host":
            where = e.host
            master, opt = store.master[name], store.opt_state[name]
        else:
            where = e.replicated
            nbytes = tree_bytes(store.master[name]) + tree_bytes(store.opt_state[name])
            stats.h2d_bytes += nbytes + tree_bytes(grads)
            e.residency.add(f"update:{name}", 2 * nbytes + tree_bytes(grads))
            master = jax.device_put(store.master[name], where)
            opt = jax.device_put(store.opt_state[name], where)
            grads = jax.device_put(grads, where)
        scale = jax.device_put(jnp.asarray(scale, F32), where)
        master, opt, stream_copy = exe(master, opt, grads, scale)
        if e.optimizer_placement != "host":
            master = jax.device_put(master, e.host)
            opt = jax.device_put(opt, e.host)
            stats.d2h_bytes += tree_bytes(master) + tree_bytes(opt)
            e.residency.drop(f"update:{name}")
        if not _on(stream_copy, e.stream_sharding):
            stream_copy = jax.device_put(stream_copy, e.stream_sharding)
        store.master[name], store.opt_state[name], store.stream[name] = master, opt, stream_copy

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self, store, batch: dict) -> dict:
        e, L, n = self.e, self.L, self.n_micro
        stats = StepStats()
        ids, labels, mask = self._batch(batch, stats)
        key = e.step_key(0)
        order = ["embed", *[f"block/{i}" for i in range(L)], "head"]
        stream = WeightStream(
            [self._fetch(o, store, True) for o in order], e.prefetch_depth, stats, e.residency
        )
        embed_exe, block_exe, head_exe = (self._exe(n) for n in self._eval_names())
        x, prev = None, None
        for pos, name in enumerate(order):
            wkey, (w, wte, _) = stream.take()
            if name == "embed":
                x = [embed_exe(w, ids[m], key, self._idx(m, 0)) for m in range(n)]
            elif name == "head":
                x = [head_exe(w, wte, x[m], labels[m], mask[m]) for m in range(n)]
            else:
                x = [block_exe(w, x[m], key, self._idx(m, pos)) for m in range(n)]
            if prev is not None:
                jax.block_until_ready(prev[1])
                stream.release(prev[0])
            prev = (wkey, x)
        jax.block_until_ready(prev[1])
        stream.release(prev[0])
        loss_sum = sum(float(r[0]) for r in x)
        count = sum(float(r[1]) for r in x)
        correct = sum(float(r[2]) for r in x)
        return {"loss_sum": loss_sum, "count": count, "correct": correct}


class _Run:
    """The state of one training step while it runs (kept activations, gradients, stats)."""

    def __init__(self, prog: StepProgram, store, batch: dict, step: int):
        self.p, self.e, self.store = prog, prog.e, store
        e, L = self.e, prog.L
        self.stats = StepStats()
        self.ids, self.labels, self.mask = prog._batch(batch, self.stats)
        self.denom_host = max(float(np.sum(np.asarray(batch["loss_mask"], np.float64))), 1.0)
        self.denom = jax.device_put(np.float32(self.denom_host), e.replicated)
        self.key = e.step_key(step)
        self.kept: list = [None] * L  # kept[i][m]: input (or residuals) of block i, device or host
        self.grads_host: dict = {}
        self.sqnorms: dict = {}
        blocks = [f"block/{i}" for i in range(L)]
        order = ["embed", *blocks, "head", *reversed(blocks), "embed"]
        fetches = []
        for pos, name in enumerate(order):
            extra = None
            if e.activation_offload and L + 1 < pos <= 2 * L + 1:  # a backward block
                i = int(name.split("/")[1])
                extra = lambda i=i: self.kept[i]  # read when the fetch is issued, not before
            fetches.append(prog._fetch(name, store, ready=pos <= L + 1, extra=extra))
        self.stream = WeightStream(fetches, e.prefetch_depth, self.stats, e.residency)
        self._prev = None

    def _take(self, exe_name: str):
        key, arrays = self.stream.take()
        exe = self.p._exe(exe_name)  # compiled first, so its scratch is known on step one
        self.e.residency.running(self.p._temp(exe_name))
        return key, arrays, exe

    def _done(self, outputs, key) -> None:
        """Item ``key`` is dispatched; wait for the previous one and free its weights."""
        if self._prev is not None:
            jax.block_until_ready(self._prev[1])
            self.stream.release(self._prev[0])
        self._prev = (key, outputs)

    def forward(self) -> list:
        p, n, idx = self.p, self.p.n_micro, self.p._idx
        wkey, (w, _, _), exe = self._take("embed_fwd")
        x = [exe(w, self.ids[m], self.key, idx(m, 0)) for m in range(n)]
        self._done(x, wkey)
        save = not self.e.recompute
        for i in range(p.L):
            wkey, (w, _, _), exe = self._take("block_fwd_save" if save else "block_fwd")
            outs = [exe(w, x[m], self.key, idx(m, i + 1)) for m in range(n)]
            if save:
                x, kept = [o[0] for o in outs], [o[1] for o in outs]
            else:
                kept, x = x, outs
            self._keep(i, kept)
            self._done(x, wkey)
        return x

    def _keep(self, i: int, kept: list) -> None:
        e, nbytes = self.e, len(kept) * self.p.kept_bytes
        if e.activation_offload:
            host = self.p.kept_shardings(e.act_host.memory_kind)
            self.kept[i] = [jax.device_put(a, host) for a in kept]
            self.stats.d2h_bytes += nbytes
        else:
            self.kept[i] = kept
            e.residency.add(f"kept:{i}", nbytes)

    def head(self, x: list):
        """Loss and its gradient per micro-batch; head gradients summed on the device."""
        p, n = self.p, self.p.n_micro
        wkey, (w, wte, _), exe = self._take("head_train")
        g = _zeros(p.g["head"])
        g_wte = _zeros(p.g["embed"]["wte"]) if p.tied else None
        self.e.residency.add("grads:head", tree_bytes(p.g["head"]))
        loss_sums, dy = [], [None] * n
        for m in range(n):
            loss_sum, dy[m], g, g_wte, sq = exe(
                w, wte, x[m], self.labels[m], self.mask[m], self.denom, g, g_wte
            )
            loss_sums.append(loss_sum)
        self._done(dy, wkey)
        self._send("head", g, sq)
        self.g_wte = g_wte
        return loss_sums, dy

    def backward(self, dy: list) -> None:
        p, n, idx, res = self.p, self.p.n_micro, self.p._idx, self.e.residency
        save = not self.e.recompute
        for i in reversed(range(p.L)):
            wkey, (w, _, fetched), exe = self._take("block_bwd_saved" if save else "block_bwd")
            kept = fetched if fetched is not None else self.kept[i]
            g = _zeros(p.g["block"])
            res.add(f"grads:block/{i}", tree_bytes(p.g["block"]))
            for m in range(n):
                if save:
                    dy[m], g, sq = exe(w, kept[m], dy[m], g)
                else:
                    dy[m], g, sq = exe(w, kept[m], dy[m], self.key, idx(m, i + 1), g)
            self.kept[i] = None
            res.drop(f"kept:{i}")
            self._done(dy, wkey)
            self._send(f"block/{i}", g, sq)

        # embed backward (tied: starts from the head's wte gradient)
        wkey, (w, _, _), exe = self._take("embed_bwd")
        g = _zeros(p.g["embed"])
        if p.tied:
            g["wte"] = self.g_wte
        for m in range(n):
            g, sq = exe(w, self.ids[m], dy[m], self.key, idx(m, 0), g)
        self._done([g, sq], wkey)
        self._done(None, None)  # wait for the last item and free it
        self._send("embed", g, sq)

    def _send(self, name: str, g, sq) -> None:
        self.p._grads_back(self.store, name, g, sq, self.grads_host, self.sqnorms, self.stats)
        self.e.residency.drop(f"grads:{name}")


def _zeros(struct_tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), struct_tree)


def _on(tree, sharding) -> bool:
    leaves = jax.tree.leaves(tree)
    return all(getattr(a, "sharding", None) == sharding for a in leaves)
