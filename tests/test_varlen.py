"""Packed documents (--reset-attention-mask, fla's varlen): a batch whose rows hold several
eod-separated documents gives, for every mixer with varlen support in a hybrid 'LN' model, each
document's logits as if it ran alone (1e-5), and the gradients of the documents run one by one
(1e-5 of each gradient's largest entry); the
training entry point passes the documents to the model.

The same batch without the documents' borders differs by ~0.2-0.7 in the logits (the mixers'
states, convs and token shifts, and the 'N' layer's attention, all reach across an eod), so the
1e-5 bound tells a missing reset apart.
"""

import pytest
import torch

from dist_utils import run_distributed
from model_utils import tiny_config, tiny_model
from linear_moe.registry import registered_mixers

VOCAB, SEQ, EOD = 128, 40, 0
TOL = 1e-5
VARLEN = sorted(n for n, e in registered_mixers().items() if e.supports_varlen)
# MoM: no load-balancing loss (a mean over the whole batch, not per document); with a capacity,
# each document's share of its own length
CASES = [(n, ()) for n in VARLEN] + [("mom_gla", (("la_mom_capacity_factor", 0.5),))]


def _documents_batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    tokens[0, 9] = tokens[0, 25] = tokens[1, 30] = EOD  # 3 documents in row 0, 2 in row 1
    return tokens


def test_document_offsets_cut_after_each_eod():
    from linear_moe.layers.documents import Documents, document_offsets

    tokens = torch.tensor([[5, 0, 7, 8], [0, 3, 0, 4]])
    offsets = document_offsets(tokens, 0)
    assert offsets.tolist() == [0, 2, 4, 5, 7, 8] and offsets.dtype == torch.int32
    documents = Documents(offsets)
    assert documents.segment_ids.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    x = torch.arange(1.0, 9.0).view(1, 8, 1)
    assert documents.previous(x, 1).flatten().tolist() == [0, 1, 0, 3, 0, 0, 6, 0]
    mask = documents.causal_mask(2)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]


def _errors_worker(rank, world_size, cases):
    import traceback

    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from linear_moe.layers.documents import packed_documents

    mpu.initialize_model_parallel(1)
    tokens = _documents_batch()
    packed = packed_documents(tokens, EOD)
    offsets = packed.cu_seqlens_q.tolist()
    positions = torch.arange(SEQ).expand(2, SEQ)
    weights = torch.randn(2 * SEQ, VOCAB, generator=torch.Generator().manual_seed(5))
    results = {}
    for case in cases:
        mixer, overrides = case
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(123)
            torch.manual_seed(123)
            model = tiny_model(tiny_config(la_module=mixer, la_chunk_size=8, la_ssm_groups=2,
                                           la_ssm_state_dim=8, la_mom_aux_loss_coeff=0.0,
                                           **dict(overrides)), "qwen2_moe", VOCAB, SEQ)
            logits = model(tokens, positions, None, packed_seq_params=packed).reshape(-1, VOCAB)
            (logits * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            flat, worst = tokens.reshape(-1), 0.0
            for start, end in zip(offsets[:-1], offsets[1:]):
                alone = model(flat[start:end][None], torch.arange(end - start)[None], None)[0]
                (alone * weights[start:end]).sum().backward()
                worst = max(worst, (alone - logits[start:end]).abs().max().item())
            errors = {"logits": worst}
            # gradients relative to their largest entry: the loss sums 80 x 128 weighted logits
            errors.update({n: ((p.grad - grads[n]).abs().max() / grads[n].abs().max()).item()
                           for n, p in model.named_parameters()})
            with torch.no_grad():
                unpacked = model(tokens, positions, None).reshape(-1, VOCAB)
            results[case] = (errors, (unpacked - logits).abs().max().item())
        except Exception:  # noqa: BLE001 - the case's test reports it
            results[case] = traceback.format_exc()
    return results


pytestmark = pytest.mark.xdist_group("varlen")


@pytest.fixture(scope="module")
def varlen_results():
    return run_distributed(_errors_worker, 1, CASES)[0]


@pytest.mark.parametrize("case", CASES, ids=[n + "".join(f"-{k}={v}" for k, v in o)
                                             for n, o in CASES])
def test_packed_documents_equal_each_document_alone(case, varlen_results):
    result = varlen_results[case]
    assert not isinstance(result, str), result
    errors, without_borders = result
    assert any(".self_attention.o_proj." in n for n in errors), "mixer grads not compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: max abs diff {errors[worst]:.3e}"
    assert without_borders > 1e-2  # the same batch without the borders is far off


@pytest.mark.slow
def test_training_passes_the_documents_to_the_model(tmp_path):
    """The first iteration's loss (the same weights and batch) changes with
    --reset-attention-mask alone: get_batch found the documents and the model used them."""
    from linear_moe.data import ensure_default_dataset
    from test_pretrain import _command, _losses, _run

    data = ensure_default_dataset(tmp_path / "data")
    flags = ("--reset-position-ids", "--eod-mask-loss", "--lr-warmup-iters", "1")
    losses = [_losses(_run(_command(data, None, la_module="gated_deltanet", train_iters=2,
                                    extra=(*flags, *extra))))[1]
              for extra in ((), ("--reset-attention-mask",))]
    assert abs(losses[0] - losses[1]) > 1e-5, losses
