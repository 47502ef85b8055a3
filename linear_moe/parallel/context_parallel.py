"""Context parallelism (CP) for the linear mixers, on megatron-core's sequence layout.

Megatron splits a sequence into 2 * cp chunks and gives rank r chunks r and 2 * cp - 1 - r, in
that order (``megatron.training.utils.get_batch_on_this_cp_rank``: causal attention's work then
balances over the ranks). A mixer layer on a rank therefore holds two pieces of the sequence,
each a contiguous run of c tokens of a known global chunk. Three things in a mixer look across
token positions, and each gets what precedes its pieces from the other ranks:

* short convolutions and token shifts read the last ``width`` inputs of the chunk before
  (``with_halo`` / ``halo``: one all-gather of every chunk's tail);
* the recurrence S_t = A_t S_{t-1} + B_t (every mixer with ``cp_value_arg``: A_t acts on the
  state's key side, S is [K, V]) is affine in its initial state, so a chunk's end state is
  M_c S_start + S_c. ``state_passing`` finds S_c (the op from a zero state) and M_c (the op with
  a zero value input from the identity state, a [K, K] state) for both pieces, all-gathers them,
  composes each piece's start state in global order, and runs the op from it (LASP-2's
  all-gather of chunk states, Sun et al. 2025, arXiv:2502.07563, with the transition read off
  the op itself, so every recurrence of that form - diagonal, scalar, delta-rule, DPLR - works
  without op-specific code). Run as written that is three op passes; ``state_passing_widened``
  runs the zero-state pass and the probe as one (the probe in the value's extra columns: the
  op's cost at V + K value width instead of three passes at V, V and K). The GLA-form ops
  (diagonal decay, read inclusive) take the one-pass form instead (``diagonal_state_passing``),
  and the delta-rule / DPLR ops whose fla kernels run CP themselves can take fla's
  (``fla_native``, --la-cp-kernel fla).

The collectives are autograd functions: a gathered tensor's gradient is summed over the ranks
(all-reduce) and each rank keeps its own part, so the states' gradients reach the ranks whose
tokens made them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """x -> [size, *x.shape], every rank's x; backward sums the gradient over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


def _is_per_token(arg, batch: int, length: int) -> bool:
    # An op's per-token inputs are [B, T, ...] with at least a head dim; its parameters
    # (decays, bonuses, D) have no batch and sequence dims.
    return torch.is_tensor(arg) and arg.dim() >= 3 and tuple(arg.shape[:2]) == (batch, length)


class SequenceChunks:
    """This rank's two pieces of megatron's CP layout, and the exchanges across them."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.chunks = self.layout(self.rank, self.size)
        self._fla_contexts = {}  # fla's FLACPContext per local length (fla_native)

    @staticmethod
    def layout(rank: int, size: int) -> tuple[int, int]:
        """The global chunk ids of a rank's two pieces, in its local order."""
        return rank, 2 * size - 1 - rank

    def _owner(self, chunk: int) -> tuple[int, int]:
        """(rank, piece) holding a global chunk."""
        return (chunk, 0) if chunk < self.size else (2 * self.size - 1 - chunk, 1)

    def per_piece(self, x: torch.Tensor, fn) -> torch.Tensor:
        """fn(piece [b, c, ...], global position of its first token) over each piece of
        x [b, 2c, ...], concatenated back."""
        c = x.shape[1] // 2
        return torch.cat([fn(x[:, p * c:(p + 1) * c], chunk * c)
                          for p, chunk in enumerate(self.chunks)], 1)

    # -- layout ---------------------------------------------------------------------------
    @staticmethod
    def fold(x: torch.Tensor) -> torch.Tensor:
        """[b, 2c, ...] -> [2b, c, ...]: the two pieces as batch rows (row 2i + piece)."""
        b, s = x.shape[:2]
        return x.reshape(2 * b, s // 2, *x.shape[2:])

    @staticmethod
    def unfold(x: torch.Tensor) -> torch.Tensor:
        b2, c = x.shape[:2]
        return x.reshape(b2 // 2, 2 * c, *x.shape[2:])

    def gather_chunks(self, folded: torch.Tensor) -> list[torch.Tensor]:
        """A per-piece tensor [2b, ...] of every rank -> one [b, ...] per global chunk, in
        sequence order."""
        b = folded.shape[0] // 2
        everyone = all_gather(folded.reshape(b, 2, *folded.shape[1:]), self.group)
        return [everyone[rank][:, piece]
                for rank, piece in map(self._owner, range(2 * self.size))]

    def carried_in(self, chunks, zero, step):
        """What the chunks before each of this rank's pieces leave: the exclusive scan
        ``after = step(before, chunk)`` over every chunk's gathered value in sequence order,
        from ``zero``; [b, 2, ...] (a tuple of them where ``zero`` is a tuple)."""
        before, starts = zero, []
        for chunk in chunks:
            starts.append(before)
            before = step(before, chunk)
        if isinstance(zero, tuple):
            return tuple(torch.stack([starts[c][i] for c in self.chunks], 1)
                         for i in range(len(zero)))
        return torch.stack([starts[c] for c in self.chunks], 1)

    # -- what precedes each piece ---------------------------------------------------------
    def halo(self, folded: torch.Tensor, width: int) -> torch.Tensor:
        """The last ``width`` tokens before each piece [2b, width, ...] (zeros before the
        sequence), from folded x [2b, c, ...]."""
        if folded.shape[1] < width:
            raise ValueError(f"a context-parallel chunk of {folded.shape[1]} tokens is shorter "
                             f"than the {width} tokens a short convolution / token shift reads "
                             "before it; use a longer --seq-length or a smaller "
                             "--context-parallel-size")
        tails = self.gather_chunks(folded[:, folded.shape[1] - width:])
        zeros = torch.zeros_like(tails[0])
        before = [tails[chunk - 1] if chunk else zeros for chunk in self.chunks]
        return torch.stack(before, 1).reshape(folded.shape[0], width, *folded.shape[2:])

    def with_halo(self, x: torch.Tensor, width: int, fn) -> torch.Tensor:
        """fn over each piece with the ``width`` tokens before it prepended, those positions
        dropped from its output; x [b, 2c, ...] -> [b, 2c, ...]."""
        folded = self.fold(x)
        extended = torch.cat([self.halo(folded, width), folded], 1)
        return self.unfold(fn(extended)[:, width:])

    # -- the recurrence ---------------------------------------------------------------------
    @staticmethod
    def map_op_inputs(args: tuple, kwargs: dict, fn) -> tuple[list, dict]:
        """An op's arguments with fn applied to the per-token ones ([b, 2c, ...]: this rank's
        two pieces) and the state arguments dropped (the CP form sets them)."""
        if kwargs.get("initial_state") is not None:
            raise ValueError("a recurrence under context parallelism starts from the state the "
                             "ranks before it pass; it takes no initial_state")
        batch, length = args[0].shape[:2]
        if length % 2:
            raise ValueError(f"a context-parallel rank holds two equal pieces; its {length} "
                             "tokens are odd")

        def mapped(value):
            return fn(value) if _is_per_token(value, batch, length) else value

        return ([mapped(a) for a in args],
                {k: mapped(v) for k, v in kwargs.items()
                 if k not in ("initial_state", "output_final_state")})

    def fold_op_inputs(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """An op's arguments with the per-token ones folded (the pieces as batch rows)."""
        return self.map_op_inputs(args, kwargs, self.fold)

    def state_passing(self, op, args: tuple, kwargs: dict, value_arg: int,
                      identity_transition: bool = False):
        """op(*args, **kwargs) -> (o, None) over the whole sequence, run on this rank's pieces
        (see the module docstring; no final state: that is the last rank's). ``value_arg``:
        the position of the op's value input (the one the state's V side is built from).

        The op's state is S [..., K, V], or a tuple (S, z, ...) whose further entries are
        key-side vectors [..., K] or None (linear attention's normaliser z_t = z_{t-1} + k_t:
        S's column for a value of 1, so the same transition carries it).
        ``identity_transition``: the recurrence has no decay (M = I), so the probe pass is
        skipped. The ops.WIDENED_PROBE ops take ``state_passing_widened``, one op pass."""
        args, kwargs = self.fold_op_inputs(args, kwargs)
        _, local = op(*args, output_final_state=True, **kwargs)  # S_c, from a zero state
        tuple_state = isinstance(local, tuple)
        parts = local if tuple_state else (local,)
        extras = [i for i, e in enumerate(parts[1:], 1) if e is not None]
        S = parts[0]
        key_dim, value_dim = S.shape[-2:]
        # [.., K, V + extras]: the extras as S's further columns, composed alike
        packed = torch.cat([S, *(parts[i].unsqueeze(-1).to(S.dtype) for i in extras)], -1)
        if identity_transition:
            chunks = self.gather_chunks(packed)
            transitions = None
        else:
            value = args[value_arg]
            probe = list(args)
            probe[value_arg] = value.new_zeros(*value.shape[:-1], key_dim)
            identity = torch.eye(key_dim, dtype=S.dtype, device=S.device)
            identity = identity.expand(*S.shape[:-2], key_dim, key_dim).contiguous()
            probe_state = (identity, *(None for _ in parts[1:])) if tuple_state else identity
            _, transition = op(*probe, initial_state=probe_state, output_final_state=True,
                               **kwargs)
            if tuple_state:
                transition = transition[0]
            width = packed.shape[-1]  # one all-gather for both: [.., K, width + K]
            everything = self.gather_chunks(torch.cat([packed, transition.to(S.dtype)], -1))
            chunks = [c[..., :width] for c in everything]
            transitions = [c[..., width:] for c in everything]
        initial = self.carried_in(  # S_end = M S_start + S_local
            range(len(chunks)), torch.zeros_like(chunks[0]),
            lambda start, i: (start if transitions is None else transitions[i] @ start)
            + chunks[i])
        initial = initial.reshape(*S.shape[:-1], packed.shape[-1])
        if tuple_state:  # back to (S, z, ...): extra i is column value_dim + its rank
            column = {i: value_dim + j for j, i in enumerate(extras)}
            initial = (initial[..., :value_dim].contiguous(),
                       *(initial[..., column[i]].to(parts[i].dtype) if i in column else None
                         for i in range(1, len(parts))))
        o, _ = op(*args, initial_state=initial, **kwargs)
        return self.unfold(o), None

    def state_passing_widened(self, op, args: tuple, kwargs: dict, value_arg: int):
        """state_passing in one op pass, for an op whose state is one S [.., H, K, V] (H the
        value heads) and whose key input, K wide, is the argument before its value: the value
        gets K zero columns and the start state is [0 | I]. S's columns evolve independently
        (the transition acts on the K side), so that one pass gives the zero-state pass's
        output and end state in the first V columns, and in the last K the probe's: the
        transition M_c (end state) and scale q_t M_t (output) - the start state's share of o_t
        is then (scale q_t M_t) S_start, one small matmul (as the diagonal form's share)."""
        args, kwargs = self.fold_op_inputs(args, kwargs)
        value, key_dim = args[value_arg], args[value_arg - 1].shape[-1]
        value_dim, heads = value.shape[-1], value.shape[-2]
        widened = list(args)
        widened[value_arg] = torch.cat([value, value.new_zeros(*value.shape[:-1], key_dim)], -1)
        start = torch.zeros(value.shape[0], heads, key_dim, value_dim + key_dim,
                            dtype=torch.float32, device=value.device)
        start[..., value_dim:] = torch.eye(key_dim, device=value.device)
        o, end = op(*widened, initial_state=start, output_final_state=True, **kwargs)
        chunks = self.gather_chunks(end.float())  # [b, H, K, V + K] a chunk: [S_c | M_c]
        initial = self.carried_in(  # S_end = M S_start + S_c
            range(len(chunks)), torch.zeros_like(chunks[0][..., :value_dim]),
            lambda before, i: chunks[i][..., value_dim:] @ before + chunks[i][..., :value_dim])
        initial = initial.flatten(0, 1)  # [2b, H, K, V], the folded rows' order
        return self.with_start_share(o[..., :value_dim], o[..., value_dim:].float(), initial)

    def with_start_share(self, o, reader, initial):
        """(o + reader S_start, None) unfolded: the start state's share added to the zero-state
        output o [2b, c, H, V], read by reader [2b, c, H, K] (scale q_t times the transition
        through t) from initial [2b, H, K, V]."""
        carried = torch.einsum("bthk,bhkv->bthv", reader, initial)
        return self.unfold((o.float() + carried).to(o.dtype)), None

    def diagonal_state_passing(self, op, args: tuple, kwargs: dict, log_decay: torch.Tensor,
                               query: torch.Tensor, scale: float | None = None,
                               reads_previous: bool = False):
        """state_passing in one op pass for the GLA-form ops (o_t = scale q_t S_t + terms
        without the state, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t): the op runs from a zero
        state, and the start state's share, scale (q_t * exp(G_t)) S_start with G_t the
        piece's running log decay through t, is added after (LASP-2's form; the transition
        is exp of the piece's total log decay, so no probe pass). ``log_decay`` [b, T, H, K]
        or [b, T, H, 1], per token (a fixed decay expanded over T); ``query`` the op's q
        [b, T, H, K] and ``scale`` its scale (None: K^-1/2). ``reads_previous``: the output
        reads S_{t-1} (RWKV-6: o_t = scale r_t (S_{t-1} + bonus)), so G_t stops at t - 1."""
        args, kwargs = self.fold_op_inputs(args, kwargs)
        o, local = op(*args, output_final_state=True, **kwargs)  # [2b, c, H, V], [2b, H, K, V]
        q = self.fold(query)
        running = self.fold(log_decay).float().cumsum(1)  # [2b, c, H, K | 1]
        total = running[:, -1].expand(*local.shape[:-1])  # [2b, H, K]
        chunks = self.gather_chunks(torch.cat([local.float(), total.unsqueeze(-1)], -1))
        initial = self.carried_in(  # S_end = exp(total) S_start + S_local
            chunks, torch.zeros_like(chunks[0][..., :-1]),
            lambda start, chunk: chunk[..., -1:].exp() * start + chunk[..., :-1]).flatten(0, 1)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        read = running - self.fold(log_decay).float() if reads_previous else running
        return self.with_start_share(o, q.float() * read.exp() * scale, initial)

    def fla_context(self, length: int, device):
        """fla's CP context for a sequence whose rank-local part is ``length`` tokens: its
        zigzag layout (rank r holds parts r and 2 * size - 1 - r, concatenated) is megatron's."""
        context = self._fla_contexts.get(length)
        if context is None:
            from fla.ops.cp import build_cp_context

            bounds = torch.tensor([0, self.size * length], dtype=torch.long)
            context = build_cp_context(bounds.to(device), self.group, cu_seqlens_cpu=bounds,
                                       layout="zigzag")
            self._fla_contexts[length] = context
        return context

    def fla_native(self, op, args: tuple, kwargs: dict):
        """op(*args, **kwargs) -> (o, None) over the whole sequence through fla's own context
        parallelism (ops.NATIVE_CONTEXT_PARALLEL: its kernels all-gather the chunks' states and
        transitions), one op pass. fla's CP takes one sequence a call, so the batch's rows run
        one after another."""
        batch, length = args[0].shape[:2]
        rows = [self.map_op_inputs(args, kwargs, lambda value, i=i: value[i:i + 1])
                for i in range(batch)]
        context = self.fla_context(length, args[0].device)
        outputs = [op(*row_args, cp_context=context, **row_kwargs)[0]
                   for row_args, row_kwargs in rows]
        return (outputs[0] if batch == 1 else torch.cat(outputs)), None
