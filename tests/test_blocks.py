"""Block weights (issue 20): block maps per family, per-block normalized weights, one range per block."""

import json
import re
from pathlib import Path

import pytest
import torch

from soup_ui.modelfiles import families
from soup_ui.maths import methods, soup
from soup_ui.errors import StudioError

CONFIGS = families.CONFIGS
LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def supermerger_block(ldm: str, last: int) -> str:
    """SuperMerger's (and sd-mecha's) rule for an LDM UNet name, written out independently."""
    if ldm.startswith(("time_embed.", "label_emb.")):
        return "BASE"
    if ldm.startswith("out."):
        return f"OUT{last:02d}"
    kind, i = LDM_BLOCK.match(ldm).groups()
    return {"input_blocks": f"IN{int(i):02d}", "middle_block": "M00", "output_blocks": f"OUT{int(i):02d}"}[kind]


def meta_unet(family: str):
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config), config


def assert_partition(blocks: families.Blocks, names) -> None:
    names = list(names)
    assert set(blocks.of) == set(names)  # no tensor left out (a dict: none in two)
    members = blocks.members()
    assert sorted(n for m in members.values() for n in m) == sorted(names)
    assert all(members[b] for b in blocks.ids), [b for b in blocks.ids if not members[b]]  # every block holds tensors


@pytest.mark.parametrize("family,count", [("sd1", 26), ("sd2", 26), ("sdxl", 20)])
def test_unet_blocks_are_supermergers_ids_and_match_the_ldm_prefixes_through_diffusers_converter(family, count):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from soup_ui.modelfiles.ldm_names import LDM_PREFIX, ldm_unet_names

    unet, config = meta_unet(family)
    names = list(unet.state_dict())
    blocks = families.block_map(family, config, names)
    assert len(blocks) == count and blocks.ids[0] == "BASE" and blocks.ids[len(blocks) // 2] == "M00"
    assert blocks.outline == ("BASE, IN00-IN11, M00, OUT00-OUT11" if count == 26 else "BASE, IN00-IN08, M00, OUT00-OUT08")
    assert_partition(blocks, names)
    # Each LDM name, converted by diffusers' own converter, lands on a tensor of the block its LDM prefix names.
    ldm = ldm_unet_names(names, config)
    tagged = {LDM_PREFIX + old: torch.empty(1, device="meta") for old in ldm.values()}
    converted = convert_ldm_unet_checkpoint(tagged, dict(config))
    origin = {id(t): old.removeprefix(LDM_PREFIX) for old, t in tagged.items()}
    last = (count - 2) // 2 - 1  # BASE and M00 aside, half are output blocks
    for name, tensor in converted.items():
        assert blocks.of[name] == supermerger_block(origin[id(tensor)], last), name


def test_a_tiny_unet_has_blocks_by_its_own_structure(studio):
    blocks = studio.blocks
    assert blocks.outline == "BASE, IN00-IN03, M00, OUT00-OUT03"
    assert_partition(blocks, studio.hybrid.state_dict())
    # the hybrid's flat buffer is laid out block by block: each block one contiguous range
    members = blocks.members()
    assert soup.part_ranges(studio.hybrid_tensors, [(members[b], ()) for b in blocks.ids]) is not None


def traced(converter, shapes: dict) -> tuple[list[str], dict[str, set[str]]]:
    """Run diffusers' converter on original tensors that each hold their own number (expanded from
    one element: no memory at real sizes); returns each converted tensor's original sources, read
    from its values (through renames, q/k/v splits and swapped halves alike)."""
    names = list(shapes)
    original = {n: torch.full((1,), float(i)).expand(shapes[n]) for i, n in enumerate(names)}
    converted = converter(dict(original))
    return names, {k: {names[int(t[(i,) * t.dim()])] for i in (0, -1)} for k, t in converted.items()}  # first and last element


def flux_meta(double: int = 19, single: int = 38, guidance: bool = True):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=guidance)


def test_flux_blocks_are_bfl_modules_and_match_through_diffusers_converter():
    """FLUX.1 at its real size (19 double + 38 single blocks) is partitioned; diffusers' converter,
    run on the original names at real widths, lands every original tensor (or its q/k/v slices) in
    the block its name says."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from tiny import bfl_shapes

    model = flux_meta()
    blocks = families.block_map("flux", model.config, model.state_dict())
    assert len(blocks) == 5 + 19 + 38 + 1
    assert blocks.outline == "img_in, txt_in, time_in, vector_in, guidance_in, double_blocks.0-18, single_blocks.0-37, final_layer"
    assert set(blocks.groups) == {"double", "single"} and len(blocks.groups["single"]) == 38
    assert_partition(blocks, model.state_dict())
    small = flux_meta(3, 4)  # the converter at real widths, with fewer blocks (it concatenates: seconds per block)
    blocks = families.block_map("flux", small.config, small.state_dict())
    _, converted = traced(convert_flux_transformer_checkpoint_to_diffusers, bfl_shapes(3, 4))
    assert set(converted) == set(small.state_dict())
    for name, sources in converted.items():
        for source in sources:
            head = source.split(".")[0]
            assert blocks.of[name] == (f"{head}.{source.split('.')[1]}" if head in ("double_blocks", "single_blocks") else head), (name, source)
    assert blocks.of["norm_out.linear.weight"] == "final_layer"
    schnell = flux_meta(2, 3, guidance=False)
    assert families.block_map("flux", schnell.config, schnell.state_dict()).outline == (
        "img_in, txt_in, time_in, vector_in, double_blocks.0-1, single_blocks.0-2, final_layer")


def sd3_original_shapes(depth: int = 24, hidden: int = 1536) -> dict:
    """Names and shapes of an SD3-medium MMDiT as Stability distributes it (without the prefix)."""
    shapes = {"pos_embed": (1, 192 * 192, hidden), "x_embedder.proj.weight": (hidden, 16, 2, 2), "x_embedder.proj.bias": (hidden,),
              "context_embedder.weight": (hidden, 4096), "context_embedder.bias": (hidden,),
              "final_layer.linear.weight": (64, hidden), "final_layer.linear.bias": (64,),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": (2 * hidden,)}
    for name, width in (("t_embedder.mlp", 256), ("y_embedder.mlp", 2048)):
        shapes |= {f"{name}.0.weight": (hidden, width), f"{name}.0.bias": (hidden,), f"{name}.2.weight": (hidden, hidden), f"{name}.2.bias": (hidden,)}
    for i in range(depth):
        for side in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{side}"
            last = side == "context_block" and i == depth - 1
            shapes |= {f"{b}.adaLN_modulation.1.weight": ((2 if last else 6) * hidden, hidden), f"{b}.adaLN_modulation.1.bias": ((2 if last else 6) * hidden,),
                       f"{b}.attn.qkv.weight": (3 * hidden, hidden), f"{b}.attn.qkv.bias": (3 * hidden,)}
            if not last:
                shapes |= {f"{b}.attn.proj.weight": (hidden, hidden), f"{b}.attn.proj.bias": (hidden,), f"{b}.mlp.fc1.weight": (4 * hidden, hidden),
                           f"{b}.mlp.fc1.bias": (4 * hidden,), f"{b}.mlp.fc2.weight": (hidden, 4 * hidden), f"{b}.mlp.fc2.bias": (hidden,)}
    return shapes


def test_sd3_blocks_are_mmdit_modules_and_match_through_diffusers_converter():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                      caption_projection_dim=1536, pos_embed_max_size=192)
    blocks = families.block_map("sd3", model.config, model.state_dict())
    assert blocks.outline == "pos_embed, x_embedder, context_embedder, y_embedder, t_embedder, joint_blocks.0-23, final_layer"
    assert_partition(blocks, model.state_dict())
    _, converted = traced(convert_sd3_transformer_checkpoint_to_diffusers, {"model.diffusion_model." + k: v for k, v in sd3_original_shapes().items()})
    assert set(converted) == set(model.state_dict())
    for name, sources in converted.items():
        for source in sources:
            parts = source.removeprefix("model.diffusion_model.").split(".")
            assert blocks.of[name] == (f"joint_blocks.{parts[1]}" if parts[0] == "joint_blocks" else parts[0]), (name, source)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_tiny_fixture_denoisers_are_partitioned(family):
    from tiny import make_flux_transformer, make_sd3_transformer, make_sdxl_unet

    model = {"sdxl": make_sdxl_unet, "sd3": make_sd3_transformer, "flux": make_flux_transformer}[family]()
    blocks = families.block_map(family, model.config, model.state_dict())
    assert_partition(blocks, model.state_dict())


# -- specs --------------------------------------------------------------------------------------------
def sd1_blocks() -> families.Blocks:
    unet, config = meta_unet("sd1")
    return families.block_map("sd1", config, unet.state_dict())


def test_a_spec_is_pairs_or_supermergers_list_and_wrong_ones_are_named():
    b = sd1_blocks()
    values = b.parse("IN:0,IN04:1,M:0.5")
    assert values[b.ids.index("IN03")] == 0 and values[b.ids.index("IN04")] == 1 and values[b.ids.index("M00")] == 0.5
    assert values[b.ids.index("BASE")] == 1 and values[b.ids.index("OUT11")] == 1  # not named: 1
    assert b.parse("out=0.25")[-1] == 0.25  # groups and IDs in any case, = as :
    listed = ",".join(["1"] * 13 + ["0"] * 13)
    assert b.parse(listed) == (1.0,) * 13 + (0.0,) * 13 == b.parse(b.format(b.parse(listed)))
    with pytest.raises(ValueError, match=r"^blocks of ink: 25 values given; this SD 1.x denoiser has 26 blocks \(BASE, IN00-IN11, M00, OUT00-OUT11\)$"):
        b.parse(",".join(["1"] * 25), "ink")
    with pytest.raises(ValueError, match=r"^blocks: value 3 \(IN01\): 'x' is not a number$"):
        b.parse("1,1,x" + ",1" * 23)
    with pytest.raises(ValueError, match=r"blocks: IN05: must be a finite number >= 0, got '-1'"):
        b.parse("IN05:-1")
    with pytest.raises(ValueError, match=r"'IN12:1': not NAME:VALUE with NAME a block \(BASE, IN00-IN11, M00, OUT00-OUT11\) or a group \(IN, M, OUT\)"):
        b.parse("IN12:1")


def test_presets_cover_the_named_shapes():
    b = sd1_blocks()
    p = b.presets()
    assert set(p) == {"all", "input only", "middle only", "output only", "ramp in", "ramp out", "composition", "style"}
    assert p["output only"] == (0.0,) * 14 + (1.0,) * 12
    assert p["composition"] == (1.0,) * 14 + (0.0,) * 12 and p["style"] == (0.0,) * 14 + (1.0,) * 12
    assert p["ramp in"][0] == 0 and p["ramp in"][-1] == 1 and p["ramp out"] == tuple(reversed(p["ramp in"]))
    flux = flux_meta()
    fp = families.block_map("flux", flux.config, flux.state_dict()).presets()
    assert {"double blocks only", "single blocks only"} <= set(fp) and "input only" not in fp


# -- maths ----------------------------------------------------------------------------------------------
def hybrid(studio) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in studio.hybrid_tensors.items()}


def test_block_weights_of_all_ones_or_uniform_equal_the_plain_soup_bit_for_bit(studio):
    studio.mix(studio.make_mix({"alpha": 1, "beta": 3}))
    plain = hybrid(studio)
    ones = studio.make_mix({"alpha": 1, "beta": 3}, blocks={"alpha": "IN:1,M:1", "beta": ",".join(["1"] * 10)})
    assert not ones.blocked and ones.key == studio.make_mix({"alpha": 1, "beta": 3}).key
    uniform = studio.make_mix({"alpha": 1, "beta": 3}, blocks={"alpha": "BASE:0.5,IN:0.5,M:0.5,OUT:0.5", "beta": ",".join(["0.5"] * 10)})
    assert uniform.blocked and uniform.label.endswith("[blocks: alpha, beta; BASE-OUT03 0.25 alpha + 0.75 beta]")
    studio.mix(uniform)
    assert all(torch.equal(studio.hybrid_tensors[n], plain[n]) for n in plain)


def test_a_block_with_weights_1_0_is_shard_a_and_blocks_normalize_apart(studio):
    a, b = studio.shards["alpha"].tensors, studio.shards["beta"].tensors
    mix = studio.make_mix({"alpha": 1, "beta": 3}, blocks={"beta": "OUT:0,IN01:2,M:0"})
    studio.mix(mix)
    members = studio.blocks.members()
    for block in ("OUT00", "OUT03", "M00"):
        for n in members[block]:
            assert torch.equal(studio.hybrid_tensors[n], a[n]), n  # (1, 0): alpha's exactly
    for n in members["IN01"]:  # 0.25 x 1 and 0.75 x 2, normalized: 1/7 and 6/7
        torch.testing.assert_close(studio.hybrid_tensors[n], a[n] / 7 + b[n] * 6 / 7, rtol=0, atol=1e-6)
    for n in members["IN02"]:  # untouched blocks: the plain 1:3 soup
        torch.testing.assert_close(studio.hybrid_tensors[n], 0.25 * a[n] + 0.75 * b[n], rtol=0, atol=1e-6)


def test_a_block_where_every_shard_is_0_keeps_the_base(studio):
    mix = studio.make_mix({"alpha": 1, "beta": 1}, blocks={"alpha": "M:0", "beta": "M:0"})
    assert mix.base_blocks == ["M00"]
    studio.mix(mix)
    for n in studio.blocks.members()["M00"]:
        assert torch.equal(studio.hybrid_tensors[n], studio.base_tensors[n]), n


def test_every_method_takes_block_weights_where_it_has_a_weight(studio):
    members = studio.blocks.members()
    a, b, base = studio.shards["alpha"].tensors, studio.shards["beta"].tensors, studio.base_tensors
    # task arithmetic: base + lambda sum_i w_ib (theta_i - base), w_ib normalized per block
    studio.mix(studio.make_mix({"alpha": 1, "beta": 1}, "task-arithmetic", {"lambda": 2}, blocks={"alpha": "OUT:0"}))
    for n in members["OUT01"]:
        torch.testing.assert_close(studio.hybrid_tensors[n], base[n] + 2 * (b[n] - base[n]), rtol=0, atol=1e-5)
    # add-difference: alpha per block, times B's multiplier; A's multipliers are refused
    studio.mix(studio.make_mix({"alpha": 1, "beta": 1}, "add-difference", {"alpha": 0.5}, blocks={"beta": "IN:0"}))
    for n in members["IN02"]:
        assert torch.equal(studio.hybrid_tensors[n], a[n])
    for n in members["OUT02"]:
        torch.testing.assert_close(studio.hybrid_tensors[n], a[n] + 0.5 * (b[n] - base[n]), rtol=0, atol=1e-6)
    with pytest.raises(StudioError, match="add-difference takes block weights on B only"):
        studio.make_mix({"alpha": 1, "beta": 1}, "add-difference", blocks={"alpha": "IN:0"})
    # ties: each block merged with its own normalized weights
    mix = studio.make_mix({"alpha": 1, "beta": 1}, "ties", {"density": 0.5}, blocks={"beta": "OUT:3"})
    studio.mix(mix)
    out = {n: torch.empty_like(studio.hybrid_tensors[n]) for n in members["OUT01"]}
    methods.merge_into(out, mix.method, mix.params, [a, b], [0.25, 0.75], base)
    for n in out:
        assert torch.equal(studio.hybrid_tensors[n], out[n]), n


def test_mixes_with_other_block_weights_are_other_mixes_and_refused_ones_name_the_shard(studio):
    one = studio.make_mix({"alpha": 1, "beta": 1}, blocks={"alpha": "OUT:0"})
    assert one.key != studio.make_mix({"alpha": 1, "beta": 1}, blocks={"alpha": "OUT:0.5"}).key
    assert one.recipe()["shards"][0]["blocks"] == list(studio.blocks.parse("OUT:0")) and one.recipe()["block_ids"] == list(studio.blocks.ids)
    assert one.reweighted({"alpha": 2, "beta": 1, "gamma": 1}).as_blocks() == {"alpha": studio.blocks.parse("OUT:0")}
    with pytest.raises(StudioError, match="block weights for 'gamma', which is not in the mix \\(alpha, beta\\)"):
        studio.make_mix({"alpha": 1, "beta": 1}, blocks={"gamma": "OUT:0"})
    with pytest.raises(StudioError, match="blocks of beta: 3 values given; this SD 1.x denoiser has 10 blocks"):
        studio.make_mix({"alpha": 1, "beta": 1}, blocks={"beta": "1,1,1"})


def test_flat_ranges_run_through_the_compiled_kernel_one_call_each(monkeypatch):
    """Each block's range is one call of the compiled kernel (a range longer than RANGE_MAX is
    split); the result equals the eager sum everywhere, and compiling happened once: later ranges
    of other lengths reuse the kernel."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(soup, "RANGE_MAX", 4000)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3000,), "b": (700,), "c": (9000,)}  # c: split in three calls
    sources = [soup.FlatTensors.pack({n: torch.randn(s, generator=g) for n, s in shapes.items()}) for _ in range(3)]
    parts = [(["a"], [0.2, 0.3, 0.5]), (["b"], [1.0, 0.0, 0.0]), (["c"], [0.0, 0.5, 0.5])]
    fused, eager = (soup.FlatTensors.pack({n: torch.zeros(s) for n, s in shapes.items()}) for _ in range(2))
    calls = []
    real = soup._run_compiled
    monkeypatch.setattr(soup, "_run_compiled", lambda kind, it: real(kind, (calls.append((c[0].numel(), len(c[1]))) or c for c in it)))
    soup.weighted_sum_parts(fused, sources, parts, fused=True)
    graphs = counters["stats"]["unique_graphs"]
    soup.weighted_sum_parts(fused, sources, [(["a", "b"], [0.1, 0.2, 0.7]), (["c"], [0.3, 0.3, 0.4])], fused=True)
    soup.weighted_sum_parts(eager, sources, parts, fused=False)
    assert calls[:5] == [(3000, 3), (700, 1), (4000, 2), (4000, 2), (1000, 2)]  # sources with weight 0 are not read
    assert counters["stats"]["unique_graphs"] == graphs  # other lengths: no new compile
    soup.weighted_sum_parts(fused, sources, parts, fused=True)
    torch.testing.assert_close(fused.buffer, eager.buffer, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused["b"], sources[0]["b"])
    torch.testing.assert_close(fused["c"], 0.5 * sources[1]["c"] + 0.5 * sources[2]["c"])


# -- CLI, recipes, grids, exports -------------------------------------------------------------------
def test_cli_blocks_render_and_their_recipe_renders_the_same_images(tiny_preset, tmp_path):
    import yaml
    from PIL import Image

    from soup_ui.cli import main

    first, second, again = tmp_path / "first", tmp_path / "second", tmp_path / "again"
    recipe = tmp_path / "r.yaml"
    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1", "--blocks", "alpha=OUT:0", "--blocks", "beta=IN:0.5,IN02:0",
                 "--prompt", "a cat face", "--seed", "4", "--out-dir", str(first), "--save-recipe", str(recipe)]) == 0
    saved = yaml.safe_load(recipe.read_text())
    assert saved["blocks"]["alpha"] == [1.0] * 6 + [0.0] * 4 and saved["blocks"]["beta"] == [1.0, 0.5, 0.5, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert main(["render", "--recipe", str(recipe), "--out-dir", str(second)]) == 0
    assert (first / "soup.png").read_bytes() == (second / "soup.png").read_bytes()
    assert "Block weights alpha: 1;1;1;1;1;1;0;0;0;0, Block weights beta: 1;0.5;0.5;0;0.5;1;1;1;1;1" in Image.open(first / "soup.png").text["parameters"]
    assert main(["render", "--recipe", str(first / "soup.png"), "--out-dir", str(again)]) == 0  # the PNG's own recipe
    assert (again / "soup.png").read_bytes() == (first / "soup.png").read_bytes()
    plain = tmp_path / "plain"
    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1", "--prompt", "a cat face", "--seed", "4", "--out-dir", str(plain)]) == 0
    assert Image.open(plain / "soup.png").tobytes() != Image.open(first / "soup.png").tobytes()


@pytest.mark.parametrize("blocks, message", [
    ("beta=1,1,1", "error: blocks of beta: 3 values given; this SD 1.x denoiser has 10 blocks (BASE, IN00-IN03, M00, OUT00-OUT03)"),
    ("zeta=IN:0", "error: --blocks: 'zeta' is not in the mix (alpha, beta)"),
    ("beta", "error: --blocks: 'beta': expected SHARD=SPEC, e.g. twemoji=IN:0,OUT:1"),
    ("beta=IN9:1", "error: blocks of beta: 'IN9:1': not NAME:VALUE with NAME a block (BASE, IN00-IN03, M00, OUT00-OUT03) or a group (IN, M, OUT)"),
])
def test_cli_bad_blocks_exit_2_with_one_line(tiny_preset, tmp_path, capsys, blocks, message):
    from soup_ui.cli import main

    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1", "--blocks", blocks, "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "x.png").exists()


def test_a_grid_over_a_block_axis_renders_each_blocks_soup(studio):
    from soup_ui.modelfiles.presets import RenderSettings
    from soup_ui.engine.workflows import Axis, grid

    settings = RenderSettings(prompt="a cat face", seed=2, steps=3, guidance_scale=4.0, height=16, width=16)
    mix = studio.make_mix({"alpha": 1, "beta": 1}, blocks={"beta": "IN:0"})
    x = Axis.parse("block:beta:OUT=0,1")
    assert x.label(0.0) == "beta:OUT=0"
    rows, row_labels, col_labels = grid(studio, mix, settings, x, Axis.parse("seed=2"))
    assert col_labels == ["beta:OUT=0", "beta:OUT=1"]
    for value, cell in zip((0, 1), rows[0]):  # beta's other blocks stay as they were (IN:0)
        expected = studio.make_mix({"alpha": 1, "beta": 1}, blocks={"beta": f"IN:0,OUT:{value}"})
        assert cell.label == expected.label
        assert cell.image.tobytes() == studio.render_soup(expected, settings).image.tobytes()
    with pytest.raises(StudioError, match="grid axis block:beta: 'IN7:0': not NAME:VALUE"):
        grid(studio, mix, settings, Axis.parse("block:beta:IN7=0"), Axis.parse("seed=2"))
    with pytest.raises(StudioError, match="a block axis names its shard and block"):
        Axis.parse("block:beta=0,1")


def test_block_sweep_takes_each_group_from_b(studio):
    from soup_ui.engine.mix import Mix
    from soup_ui.modelfiles.presets import RenderSettings
    from soup_ui.engine.workflows import block_sweep

    settings = RenderSettings(prompt="a cat face", seed=2, steps=3, guidance_scale=4.0, height=16, width=16)
    results = block_sweep(studio, studio.make_mix({"alpha": 1, "beta": 1}), "alpha", "beta", settings)
    assert [r.info["group"] for r in results] == ["all from alpha", "BASE from beta", "IN00-01 from beta", "IN02-03 from beta", "M00 from beta",
                                                  "OUT00-01 from beta", "OUT02-03 from beta", "all from beta"]
    alone = [studio.render_soup(Mix.alone(studio.shards[n]), settings).image.tobytes() for n in ("alpha", "beta")]
    assert results[0].image.tobytes() == alone[0] and results[-1].image.tobytes() == alone[1]
    assert results[0].info["pixels"] == 0 and all(r.info["pixels"] > 0 for r in results[2:])
    with pytest.raises(StudioError, match="two different shards"):
        block_sweep(studio, studio.make_mix({"alpha": 1}), "alpha", "alpha", settings)


def test_exports_write_block_weights_as_supermergers_mbw_and_streamed_equals_in_memory(tiny_preset, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from soup_ui.cli import main

    streamed, in_memory = tmp_path / "streamed.safetensors", tmp_path / "pipeline"
    args = ["--preset", str(tiny_preset), "--mix", "alpha=1,beta=3", "--blocks", "beta=OUT:0,M:0.5"]
    assert main(["export", *args, "--out", str(streamed)]) == 0
    assert main(["export", *args, "--format", "pipeline", "--out", str(in_memory)]) == 0
    a, b = load_file(str(streamed)), load_file(str(in_memory / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    with safe_open(str(streamed), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    # B's share per block: 3/4 where beta is whole, 0 in OUT, 0.375 / (0.25 + 0.375) = 0.6 in M00
    assert recipe["mbw"] is True and recipe["weights_alpha"] == "0.75,0.75,0.75,0.75,0.75,0.6,0,0,0,0"
    assert recipe["block_ids"] == "BASE,IN00,IN01,IN02,IN03,M00,OUT00,OUT01,OUT02,OUT03"
    ours = json.loads(meta["soup_ui.recipe"])
    assert ours["shards"][1]["blocks"] == [1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0] and ours["label"].endswith("[blocks: beta; BASE-IN03 0.25 alpha + 0.75 beta, M00 0.40 alpha + 0.60 beta, OUT00-OUT03 1.00 alpha]")


def test_a_recipe_with_block_weights_restores_each_rows_line():
    from soup_ui.modelfiles.presets import Recipe
    from soup_ui.page.ui import MAX_SHARDS, block_line, restored

    recipe = Recipe(mix={"alpha": 1, "gamma": 2}, blocks={"gamma": [1, 0.5, 0], "alpha": "OUT:0"})
    updates = restored(["alpha", "beta", "gamma"], dict(recipe.mix), recipe, "loaded")
    lines = updates[-1 - MAX_SHARDS : -1]
    assert lines[:3] == ["OUT:0", "", "1,0.5,0"] and set(lines[3:]) == {""} and updates[-1] == "loaded"
    assert block_line(None) == "" and block_line([0.25, 1.0]) == "0.25,1"
    with pytest.raises(ValueError, match="block weights for 'beta', which is not in the mix"):
        Recipe(mix={"alpha": 1}, blocks={"beta": "IN:0"})


def test_the_block_picture_colours_each_row_as_its_mixture_bar_and_names_base_blocks():
    from soup_ui.page.session import blocks_picture

    b = sd1_blocks()
    html = blocks_picture(b, ["ink", "pastel"], {"ink": "OUT:0,M:0", "pastel": "M:0"}, ["#aa0000", "#00bb00"])
    assert html.count("background:#aa0000") == 26 and html.count("background:#00bb00") == 26
    assert "title='ink OUT03: x0, share 0%' style='background:#aa0000;opacity:0.08'" in html
    assert "title='pastel OUT03: x1, share 100%' style='background:#00bb00;opacity:1.00'" in html
    assert "every ticked shard is 0 in M00: there the soup keeps the base's weights" in html
    assert "blocks of pastel: 2 values given" in blocks_picture(b, ["pastel"], {"pastel": "1,1"}, ["#00bb00"])


def test_the_share_of_each_block_is_said_where_multipliers_are_given(studio):
    """Issue 33, defect 6: a SuperMerger user's `--blocks gamma=0.5` with another shard at 1 gives gamma
    a third of each block, not half (multipliers are normalized per block), and nothing said so. The
    label, the picture and the CLI's message now give each block's resulting shares."""
    from soup_ui.page.session import blocks_picture

    mix = studio.make_mix({"alpha": 1, "gamma": 1}, blocks={"gamma": ",".join(["0.5"] * 10)})
    assert mix.label == "soup: 0.50 alpha + 0.50 gamma [blocks: gamma; BASE-OUT03 0.67 alpha + 0.33 gamma]"
    varied = studio.make_mix({"alpha": 1, "gamma": 1}, blocks={"gamma": "IN:0,OUT:1,M:0.5"})
    assert varied.block_summary == "by block: alpha 0.50-1.00, gamma 0.00-0.50"  # four runs of equal shares: each shard's range
    two = studio.make_mix({"alpha": 1, "gamma": 1}, blocks={"gamma": "OUT:0"})
    assert two.block_summary == "BASE-M00 0.50 alpha + 0.50 gamma, OUT00-OUT03 1.00 alpha"
    html = blocks_picture(studio.blocks, ["alpha", "gamma"], {"gamma": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"}, ["#aa0000", "#00bb00"], {"alpha": 1, "gamma": 1})
    assert "title='gamma IN02: x0.5, share 33%'" in html and "BASE-OUT03 0.67 alpha + 0.33 gamma" in html


def test_supermergers_alpha_list_is_taken_in_its_own_meaning(tiny_preset, tmp_path, capsys):
    """SuperMerger's block-weighted weight sum of A and B: block b is (1 - alpha_b) A + alpha_b B,
    whatever the --mix weights; checked tensor by tensor against that formula."""
    from safetensors.torch import load_file

    from soup_ui.cli import main
    from soup_ui.engine.studio import Studio
    from soup_ui.modelfiles.presets import load_preset

    alphas = [0, 0.25, 0.5, 1, 0.3, 0.7, 1, 0, 0.5, 0.1]
    out = tmp_path / "sm.safetensors"
    assert main(["export", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=3", "--supermerger-alpha", ",".join(map(str, alphas)),
                 "--format", "unet", "--dtype", "float32", "--out", str(out)]) == 0
    merged = load_file(out)
    studio = Studio(load_preset(tiny_preset))
    a, b = studio.shards["alpha"].tensors, studio.shards["beta"].tensors
    members = studio.blocks.members()
    for block, alpha in zip(studio.blocks.ids, alphas):
        for n in members[block]:
            torch.testing.assert_close(merged[n], (1 - alpha) * a[n].float() + alpha * b[n].float(), rtol=0, atol=2e-6, msg=f"{block} {n}")
    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1,gamma=1", "--supermerger-alpha", "0.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "--supermerger-alpha is SuperMerger's weight sum of two models" in capsys.readouterr().err
    assert main(["render", "--preset", str(tiny_preset), "--mix", "alpha=1,beta=1", "--supermerger-alpha", "0.5,1.5", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("--supermerger-alpha: SuperMerger alpha: value 2 is 1.5; alpha is B's share of a block, between 0 and 1")
    with pytest.raises(ValueError, match="SuperMerger alpha: 2 values given; this SD 1.x denoiser has 10 blocks"):
        studio.blocks.from_alpha("0.5,0.5")
