"""Registry, layer pattern, CLI listing and early argument errors."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from arg_utils import parsed_args
from linear_moe.arguments import preset_argv, validate_args
from linear_moe.registry import expand_layer_pattern, get_mixer, register_mixer, registered_mixers


def test_builtin_mixers_registered():
    mixers = registered_mixers()
    assert {"gla", "gated_deltanet"} <= set(mixers)
    for entry in mixers.values():
        assert entry.paper and entry.kernel and entry.modes


def test_unknown_mixer_lists_registered():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'.*gated_deltanet.*gla"):
        get_mixer("nope")


def test_duplicate_registration_refused(monkeypatch):
    from linear_moe import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_mixers()))

    class A:
        pass

    class B:
        pass

    register_mixer("_test_dup", paper="p", kernel="k")(A)
    with pytest.raises(ValueError, match="registered twice"):
        register_mixer("_test_dup", paper="p", kernel="k")(B)


@pytest.mark.parametrize("pattern,layers,expected", [
    ("LLLN", 4, "LLLN"), ("LN", 6, "LNLNLN"), ("L", 3, "LLL"), ("LLLNLLLN", 8, "LLLNLLLN"),
])
def test_pattern_expansion(pattern, layers, expected):
    assert expand_layer_pattern(pattern, layers) == expected


@pytest.mark.parametrize("pattern,layers,message", [
    ("LLN", 4, "neither equals nor divides --num-layers 4"),
    ("LLNLL", 4, "neither equals nor divides"),
    ("LXN", 3, r"invalid character\(s\) \['X'\]"),
    ("llln", 4, "invalid character"),
    ("", 4, "empty"),
])
def test_pattern_errors(pattern, layers, message):
    with pytest.raises(ValueError, match=message):
        expand_layer_pattern(pattern, layers)


def test_cli_lists_mixers_with_support_flags():
    out = subprocess.run([sys.executable, "-m", "linear_moe.cli", "mixers"], capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    names = [line.split("\t")[0] for line in lines]
    assert names == sorted(registered_mixers())
    for line in lines:
        for flag in ("tp=", "cp=", "varlen=", "decode="):
            assert flag in line


def test_packed_documents_are_accepted_for_the_varlen_mixers():
    for name, entry in registered_mixers().items():
        if entry.supports_varlen:
            validate_args(parsed_args(la_module=name, reset_attention_mask=True))


def test_context_parallel_support_is_what_the_mixer_can_do():
    """A mixer claims CP exactly when it says where its op's value input is (the state passing
    reads the op's transition with it); validate_args accepts CP for those."""
    for name, entry in registered_mixers().items():
        assert entry.supports_cp == entry.builder.has_cp_support(), name
        if entry.supports_cp:
            validate_args(parsed_args(la_module=name, context_parallel_size=2, seq_length=64))


def test_validate_fills_pattern_and_mixer_defaults():
    args = parsed_args(la_module="gated_deltanet", layer_type_list="LN")
    validate_args(args)
    assert args.layer_type_list == "LNLN"
    assert args.la_use_short_conv is True and args.la_expand_v == 1.5
    assert args.la_num_heads == 4


@pytest.mark.parametrize("dropout,bias,fused", [(0.0, False, False), (0.1, False, True),
                                                 (0.0, True, True)])
def test_bias_dropout_fusion_off_where_it_has_nothing_to_fuse(dropout, bias, fused):
    """Without dropout and bias megatron-core's fused bias-dropout-add is a compiled call around
    the same single residual add (more host time a call); elsewhere it stays as set."""
    args = parsed_args(bias_dropout_fusion=True, hidden_dropout=dropout, add_bias_linear=bias)
    validate_args(args)
    assert args.bias_dropout_fusion is fused


def test_unfused_residual_add_equals_the_fused_one_in_bf16():
    import torch
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    x, residual = (torch.randn(5, 2, 8).to(torch.bfloat16).requires_grad_() for _ in range(2))
    outs = []
    for fused in (True, False):
        out = get_bias_dropout_add(True, fused)((x, None), residual, 0.0)
        grads = torch.autograd.grad(out, (x, residual), torch.ones_like(out))
        outs.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("overrides,message", [
    (dict(la_module="nope"), "unknown mixer"),
    (dict(layer_type_list="LLN"), "divides --num-layers"),
    (dict(la_mode="parallel"), "no --la-mode 'parallel'"),
    (dict(tensor_model_parallel_size=3), "not divisible by --tensor-model-parallel-size 3"),
    (dict(context_parallel_size=2, seq_length=66), "--seq-length 66 is not divisible by 2 x"),
    (dict(la_module="gated_deltanet", context_parallel_size=4, seq_length=24),
     "chunks of 3 tokens, shorter than a short convolution's 4"),
    (dict(context_parallel_size=2, seq_length=64, multi_latent_attention=True),
     "MLA attention .* no context-parallel support"),
    (dict(expert_model_parallel_size=3), "--num-experts 8 is not divisible"),
    (dict(reset_attention_mask=True, context_parallel_size=2, seq_length=64),
     "--reset-attention-mask with --context-parallel-size"),
])
def test_validate_errors_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_args(parsed_args(**overrides))


@pytest.mark.parametrize("support,flags,message", [
    ("supports_varlen", dict(reset_attention_mask=True), "mixer 'gsa' has no packed-document"),
    ("supports_cp", dict(context_parallel_size=2, seq_length=64),
     "mixer 'gsa' has no context-parallel support"),
])
def test_a_mixer_registered_without_a_support_is_refused(monkeypatch, support, flags, message):
    """Every shipped mixer takes packed documents and CP; one registered without is refused."""
    import dataclasses

    from linear_moe import registry

    entry = dataclasses.replace(registry.get_mixer("gsa"), **{support: False})
    monkeypatch.setitem(registry._REGISTRY, "gsa", entry)
    with pytest.raises(ValueError, match=message):
        validate_args(parsed_args(la_module="gsa", **flags))


def test_preset_flags_come_first_so_user_flags_win():
    argv = preset_argv(["--model-size", "tiny", "--num-layers", "8"])
    assert argv[-2:] == ["--num-layers", "8"]
    assert argv.index("--num-layers") < len(argv) - 2  # the preset's value precedes
    with pytest.raises(ValueError, match="unknown --model-size 'huge'.*tiny"):
        preset_argv(["--model-size", "huge"])


def test_missing_dataset_fails_before_any_work(tmp_path):
    from linear_moe.pretrain import check_data_paths

    args = SimpleNamespace(data_path=[str(tmp_path / "corpus_text_document")], mock_data=False,
                           sft_data_path=None,
                           train_data_path=None, valid_data_path=None, test_data_path=None)
    with pytest.raises(FileNotFoundError, match="corpus_text_document.bin not found.*preprocess"):
        check_data_paths(args)


def test_readme_mixer_table_lists_every_registered_mixer():
    """README's mixer table is the user's index: a registered mixer without a row is a defect."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Mixers"):readme.index("### The fla Hopper guard")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name.strip("` ") for row in rows for name in row.split("|")[1].split(",")}
    assert set(registered_mixers()) <= named, set(registered_mixers()) - named
    # the support columns say what the registry says (TP, CP, varlen, decode)
    for row in rows:  # (the section's other tables list options, not mixers)
        cells = row.split("|")
        for name in (n.strip("` ") for n in cells[1].split(",")):
            entry = registered_mixers().get(name)
            if entry is None:
                continue
            claimed = [c.strip().startswith("yes") for c in cells[4:8]]
            assert claimed == [entry.supports_tp, entry.supports_cp, entry.supports_varlen,
                               entry.supports_decode], (name, cells[4:8])


def test_cuda_graph_flag_is_checked_before_any_work(monkeypatch):
    """--cuda-graph-impl: only megatron-core's full_iteration, only on a GPU, only for mixers
    that can be captured, only without the host-side NaN check (one-line errors with the fix)."""
    from arg_utils import parsed_args

    from linear_moe.arguments import validate_args

    validate_args(parsed_args(["--la-module", "gla"], cuda_graph_impl="none"))
    with pytest.raises(ValueError, match="use --cuda-graph-impl full_iteration"):
        validate_args(parsed_args(["--la-module", "gla"], cuda_graph_impl="local"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a GPU; drop it on the CPU"):
            validate_args(parsed_args(["--la-module", "gla"], cuda_graph_impl="full_iteration"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks after the GPU one
    with pytest.raises(ValueError, match="'mom_gla' syncs with the host.*drop --cuda-graph-impl"):
        validate_args(parsed_args(["--la-module", "mom_gla"], cuda_graph_impl="full_iteration",
                                  check_for_nan_in_loss_and_grad=False))
    with pytest.raises(ValueError, match="cannot capture megatron-core's MoE dispatchers.*add "
                                         "--moe-device-dispatch"):
        validate_args(parsed_args(["--la-module", "gla"], cuda_graph_impl="full_iteration",
                                  check_for_nan_in_loss_and_grad=False, num_experts=8))
    validate_args(parsed_args(["--la-module", "gla", "--moe-device-dispatch"],
                              cuda_graph_impl="full_iteration",
                              check_for_nan_in_loss_and_grad=False, num_experts=8))
    dense = dict(cuda_graph_impl="full_iteration", num_experts=None)
    with pytest.raises(ValueError, match="needs --no-check-for-nan-in-loss-and-grad"):
        validate_args(parsed_args(["--la-module", "gla"], check_for_nan_in_loss_and_grad=True,
                                  **dense))
    validate_args(parsed_args(["--la-module", "gla"], check_for_nan_in_loss_and_grad=False,
                              **dense))
    # A pattern without 'L' never builds the mixer.
    validate_args(parsed_args(["--la-module", "mom_gla", "--layer-type-list", "N"],
                              check_for_nan_in_loss_and_grad=False, **dense))
