"""Chips, clusters, presets against hardware_facts.md, NVML names, files, group arithmetic."""
import dataclasses
import json
from importlib import resources

import pytest

from workbench import hardware as hw

# /work/shared/data/hardware_facts.md, dense peaks in TFLOP/s, HBM in GB, bandwidth in GB/s.
FACTS = {
    #               bf16/fp16  fp8     tf32   fp32  HBM  HBM GB/s  power W
    "a100-sxm-80gb": (312, None, 156, 19.5, 80, 2039, 400),
    "a100-sxm-40gb": (312, None, 156, 19.5, 40, 1555, 400),
    "h100-sxm": (989.4, 1978.9, 494.7, 66.9, 80, 3350, 700),
    "h200-sxm": (989.4, 1978.9, 494.7, 66.9, 141, 4800, 700),
    "b200": (2250, 4500, 1100, 75, 180, 7700, 1000),
}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_chip_presets_match_facts(name):
    bf16, fp8, tf32, fp32, hbm_gb, hbm_GBps, power = FACTS[name]
    c = hw.chip(name)
    # TFLOP/s * 1e12 and GB * 1e9: the decimal literal in chips.toml parses to the same float.
    assert c.peak_flops_per_s("bf16") == float(f"{bf16}e12")
    assert c.peak_flops_per_s("fp16") == float(f"{bf16}e12")
    assert c.peak_flops_per_s("tf32") == float(f"{tf32}e12")
    assert c.peak_flops_per_s("fp32") == float(f"{fp32}e12")
    if fp8 is None:
        with pytest.raises(ValueError, match="no peak FLOP/s figure for dtype 'fp8'"):
            c.peak_flops_per_s("fp8")
    else:
        assert c.peak_flops_per_s("fp8") == float(f"{fp8}e12")
    assert c.memory_bytes == hbm_gb * 10**9
    assert c.memory_bandwidth_Bps == hbm_GBps * 1e9
    assert c.power_w == power
    assert c.source and c.name == name


def test_dtype_aliases_and_errors():
    h100 = hw.chip("h100-sxm")
    assert h100.peak_flops_per_s("bfloat16") == h100.peak_flops_per_s("torch.bfloat16") == 989.4e12
    assert h100.peak_flops_per_s("float32") == 66.9e12
    with pytest.raises(ValueError, match="no peak FLOP/s figure for dtype 'int4'"):
        h100.peak_flops_per_s("int4")
    with pytest.raises(ValueError, match="no peak FLOP/s figure for dtype 'fp16'"):
        hw.load_cpu_chip().peak_flops_per_s("fp16")  # the calibration measures fp32 and bf16 only
    with pytest.raises(ValueError, match="unknown chip 'h800'"):
        hw.chip("h800")


# (preset, chip, NVLink GB/s per direction, NIC GB/s per GPU, nodes per scalable unit)
DGX = [("dgx-a100", "a100-sxm-80gb", 300, 25, 20),   # HDR 200 Gb/s / 8 = 25 GB/s
       ("dgx-h100", "h100-sxm", 450, 50, 32),        # NDR 400 Gb/s / 8 = 50 GB/s
       ("dgx-h200", "h200-sxm", 450, 50, 32),
       ("dgx-b200", "b200", 900, 50, 32)]


@pytest.mark.parametrize("preset,chip,nvlink,nic,su_nodes", DGX)
def test_dgx_presets(preset, chip, nvlink, nic, su_nodes):
    cl = hw.cluster(preset)
    assert cl.chip == hw.chip(chip) and cl.n_chips == 8 and cl.n_nodes == 1
    node, rack, top = cl.levels
    assert (node.name, node.size, node.bandwidth_Bps) == ("node", 8, nvlink * 1e9)
    assert (rack.name, rack.size, rack.bandwidth_Bps) == ("rack", su_nodes * 8, nic * 1e9)
    assert (top.name, top.bandwidth_Bps) == ("cluster", nic * 1e9)
    assert all(lv.oversubscription == 1.0 and lv.source for lv in cl.levels)
    # NCCL tuning.cc hwLat Ring/Simple: NVLink 3.4 us, NET 14.0 us per hop.
    assert (node.latency_s, rack.latency_s, top.latency_s) == (3.4e-6, 14.0e-6, 14.0e-6)


def test_cpu_chip_and_cluster_from_calibration(tmp_path):
    c = hw.load_cpu_chip()
    assert c == hw.chip("cpu") and c.name == "cpu" and c.nvml_names == () and c.power_w is None
    assert set(c.dense_flops_per_s) == {"fp32", "bf16"} and "Measured" in c.source
    cl = hw.cluster("cpu")
    assert cl.chip == c and len(cl.levels) == 1 and cl.n_chips == cl.node_size >= 1
    assert "gloo" in cl.levels[0].source
    with pytest.raises(ValueError, match="cores of the calibrated host"):
        hw.cluster("cpu", cl.node_size + 1)
    # A user's calibration file in the same format is read instead of the default.
    data = json.loads((resources.files("workbench") / "data/cpu.json").read_text())
    data["chip"]["dense_flops_per_s"]["fp32"] = 1e9
    (tmp_path / "mine.json").write_text(json.dumps(data))
    assert hw.load_cpu_chip(tmp_path / "mine.json").peak_flops_per_s("fp32") == 1e9
    data["extra"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        hw.load_cpu_chip(tmp_path / "bad.json")


@pytest.mark.parametrize("nvml,expected", [
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ("NVIDIA A100-SXM-80GB", "a100-sxm-80gb"),
    ("A100-SXM4-80GB", "a100-sxm-80gb"),           # older drivers: no vendor prefix
    ("Tesla A100-SXM4-80GB", "a100-sxm-80gb"),
    (b"NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),   # old pynvml returns bytes
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("nvidia  h100-80gb-hbm3 ", "h100-sxm"),        # case, dashes, spacing
    ("NVIDIA H100 SXM5 80GB", "h100-sxm"),
    ("NVIDIA H200", "h200-sxm"),
    ("NVIDIA H200 141GB HBM3e", "h200-sxm"),
    ("NVIDIA B200", "b200"),
])
def test_nvml_name_matching(nvml, expected):
    assert hw.chip_for_nvml_name(nvml).name == expected


@pytest.mark.parametrize("nvml", ["NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL",
                                  "NVIDIA H800", "NVIDIA A100 80GB PCIe", "NVIDIA H100",
                                  "NVIDIA GeForce RTX 4090", ""])
def test_unknown_nvml_name_is_an_error(nvml):
    with pytest.raises(ValueError, match="unknown NVML device name"):
        hw.chip_for_nvml_name(nvml)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("preset,n", [("dgx-h100", 1024), ("dgx-a100", 8), ("cpu", None)])
def test_cluster_round_trip(tmp_path, suffix, preset, n):
    cl = hw.cluster(preset, n)
    path = tmp_path / f"c{suffix}"
    hw.save_cluster(cl, path)
    back = hw.load_cluster(path)
    assert back == cl and hash(back) == hash(cl)  # hashable: usable as a cache key


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("name", ["b200", "cpu"])
def test_chip_round_trip(tmp_path, suffix, name):
    c = hw.chip(name)
    hw.save_chip(c, tmp_path / f"chip{suffix}")
    assert hw.load_chip(tmp_path / f"chip{suffix}") == c


def test_cluster_file_may_name_a_chip_preset(tmp_path):
    (tmp_path / "mine.toml").write_text(
        'name = "my-pod"\nchip = "h100-sxm"\nn_chips = 16\nsource = "our racks"\n'
        '[[levels]]\nname = "node"\nsize = 8\nbandwidth_Bps = 450e9\nlatency_s = 3e-6\n'
        'oversubscription = 1.0\nsource = "NVLink4"\n'
        '[[levels]]\nname = "cluster"\nsize = 64\nbandwidth_Bps = 50e9\nlatency_s = 1e-5\n'
        'oversubscription = 2.0\nsource = "2:1 tapered Ethernet"\n')
    cl = hw.load_cluster(tmp_path / "mine.toml")
    assert cl.chip == hw.chip("h100-sxm") and cl.n_nodes == 2
    # 2 nodes: the group of 16 crosses the 2:1 tapered level, 50e9 / 2 = 25e9 per chip.
    assert cl.group_bandwidth_Bps(16) == 25e9 and cl.group_latency_s(16) == 1e-5


def _cluster_dict():
    return hw.cluster_to_dict(hw.cluster("dgx-h100", 16))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(nodes=2), "cluster: unknown key 'nodes'"),
    (lambda d: d.pop("source"), "cluster: missing key 'source'"),
    (lambda d: d["levels"][1].update(bandwith_Bps=1.0), r"cluster.levels\[1\]: unknown key 'bandwith_Bps'"),
    (lambda d: d["levels"][0].pop("latency_s"), r"cluster.levels\[0\]: missing key 'latency_s'"),
    (lambda d: d["chip"].update(hbm_bytes=1), "cluster.chip: unknown key 'hbm_bytes'"),
    (lambda d: d["chip"].pop("memory_bytes"), "cluster.chip: missing key 'memory_bytes'"),
    (lambda d: d["chip"]["dense_flops_per_s"].update(int8=1e15),
     "cluster.chip.dense_flops_per_s: unknown key 'int8'"),
    (lambda d: d.update(n_chips="16"), "cluster.n_chips must be an integer"),
    (lambda d: d["levels"][0].update(size=8.0), r"cluster.levels\[0\].size must be an integer"),
    (lambda d: d["levels"][1].update(bandwidth_Bps=0), "level rack: bandwidth_Bps must be > 0"),
    (lambda d: d["levels"][1].update(oversubscription=0.5), "level rack: oversubscription must be >= 1"),
    (lambda d: d["levels"][1].update(size=100), r"levels\[1\].size \(100, rack\) must be a multiple"),
    (lambda d: d["levels"][2].update(name="node"), "level names must be unique"),
    (lambda d: d["chip"].update(chip="x"), "cluster.chip: unknown key 'chip'"),
    (lambda d: d.update(chip="tpu-v5"), "unknown chip 'tpu-v5'"),
    (lambda d: d["chip"].update(memory_bandwidth_Bps=-1.0), "memory_bandwidth_Bps must be > 0"),
    (lambda d: d["chip"].update(power_w=0), "power_w must be > 0"),
    (lambda d: d["chip"]["dense_flops_per_s"].update(bf16=True),
     "dense_flops_per_s.bf16 must be a number"),
])
def test_strict_loading(tmp_path, edit, message):
    d = _cluster_dict()
    edit(d)
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        hw.load_cluster(tmp_path / "c.json")


def test_file_suffix_and_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="must end in .toml or .json"):
        hw.save_cluster(hw.cluster("dgx-h100"), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="unknown cluster preset 'dgx-h300'"):
        hw.cluster("dgx-h300", 8)


def test_n_chips_validation():
    assert hw.cluster("dgx-h100", 4).n_nodes == 1               # a slice of one node is fine
    assert hw.cluster("dgx-h100", 1016).n_nodes == 127          # 127 nodes (4 SUs less one)
    with pytest.raises(ValueError, match=r"n_chips \(12\) must be a multiple of the node size \(8\)"):
        hw.cluster("dgx-h100", 12)
    with pytest.raises(ValueError, match=r"cluster.n_chips must be >= 1"):
        hw.cluster("dgx-h100", 0)
    base = hw.cluster("dgx-h100", 8)
    with pytest.raises(ValueError, match=r"n_chips \(512\) must be <= the top level 'cluster' size \(256\)"):
        dataclasses.replace(base, n_chips=512)


def test_top_level_grows_in_whole_scalable_units():
    # dgx-h100 SU = 32 nodes x 8 = 256 GPUs; 1,000 GPUs need ceil(1000/256) = 4 SUs = 1,024.
    assert [lv.size for lv in hw.cluster("dgx-h100", 1000).levels] == [8, 256, 1024]
    assert [lv.size for lv in hw.cluster("dgx-h100", 8).levels] == [8, 256, 256]
    # dgx-a100 SU = 20 nodes x 8 = 160 GPUs; 1,120 GPUs (140 nodes) = 7 SUs.
    assert [lv.size for lv in hw.cluster("dgx-a100", 1120).levels] == [8, 160, 1120]


def test_level_spanning_arithmetic():
    cl = hw.cluster("dgx-h100", 1024)   # node 8, rack 256, cluster 1024
    assert cl.n_nodes == 128            # 1024 / 8
    assert cl.span_level(1) is None     # one rank sends nothing
    assert cl.span_level_index(8) == 0                     # 8 | 8: TP inside a node
    assert cl.span_level_index(2, stride=4) == 0           # block 2*4 = 8 | 8
    assert cl.span_level_index(4, stride=4) == 1           # block 16: not | 8, | 256
    assert cl.span_level_index(32, stride=8) == 1          # block 256 | 256: one SU
    assert cl.span_level_index(64, stride=8) == 2          # block 512 | 1024 only
    assert cl.span_level_index(3) == 2  # block 3 divides neither 8 nor 256: [6, 9) crosses a node
    assert cl.span_level(16).name == "rack"
    # DP group of 64 at stride 8 (TP = 8): 64 nodes (stride 8 >= node size), racks
    # (63*8) // 256 + 1 = 504 // 256 + 1 = 2, cluster 504 // 1024 + 1 = 1.
    assert cl.group_units(64, stride=8) == (64, 2, 1)
    # 16 consecutive ranks: nodes 15 // 8 + 1 = 2, racks 1, cluster 1.
    assert cl.group_units(16) == (2, 1, 1)
    # 4 ranks at stride 2: (3*2) // 8 + 1 = 1 node.
    assert cl.group_units(4, stride=2) == (1, 1, 1)
    assert cl.group_bandwidth_Bps(8) == 450e9 and cl.group_latency_s(8) == 3.4e-6
    assert cl.group_bandwidth_Bps(64, stride=8) == 50e9 and cl.group_latency_s(16) == 14e-6
    assert cl.peak_flops_per_s("bf16") == 1024 * 989.4e12
    assert cl.level("rack").size == 256 and cl.level_index("cluster") == 2
    with pytest.raises(ValueError, match=r"n\*stride = 2048 chips, more than cluster.n_chips \(1024\)"):
        cl.span_level_index(256, stride=8)
    with pytest.raises(ValueError, match="group size n must be >= 2"):
        cl.group_bandwidth_Bps(1)
    with pytest.raises(ValueError, match="has no level 'spine'"):
        cl.level("spine")


def test_list_presets():
    p = hw.list_presets()
    assert set(p["chips"]) == {"a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h200-sxm", "b200",
                               "cpu"}
    assert set(p["clusters"]) == {"dgx-a100", "dgx-h100", "dgx-h200", "dgx-b200", "cpu"}
    for name in p["clusters"]:
        assert hw.cluster(name).source
