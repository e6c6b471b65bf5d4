import pytest
import torch

from centerpoint.errors import CenterpointError
from centerpoint.runtime import devices


def test_auto_prefers_cuda_then_sdaa_then_cpu():
    assert devices.resolve_name("auto", lambda n: n in ("cuda", "sdaa")) == "cuda"
    assert devices.resolve_name("auto", lambda n: n == "sdaa") == "sdaa"
    assert devices.resolve_name("auto", lambda n: False) == "cpu"
    assert devices.resolve_name("cpu", lambda n: n == "cpu") == "cpu"


def test_explicit_device_must_exist():
    with pytest.raises(CenterpointError, match="torch_sdaa is not installed"):
        devices.resolve_name("sdaa", lambda n: n == "cpu")
    with pytest.raises(CenterpointError, match="no CUDA GPU"):
        devices.resolve_name("cuda", lambda n: n == "cpu")
    with pytest.raises(CenterpointError, match="expected auto"):
        devices.resolve_name("tpu")


def test_backends_strings_and_policies():
    sdaa = devices.make_backend("sdaa", 2)
    assert sdaa.device_string == "sdaa:2" and sdaa.dist_backend == "tccl" and not sdaa.compile_by_default
    cuda = devices.make_backend("cuda", 1)
    assert cuda.device_string == "cuda:1" and cuda.dist_backend == "nccl" and cuda.compile_by_default
    cpu = devices.make_backend("cpu")
    assert cpu.dist_backend == "gloo" and cpu.free_sync and not cpu.compile_by_default
    assert devices.should_compile(cuda, "auto") and not devices.should_compile(cpu, "auto")
    assert devices.should_compile(cpu, "on") and not devices.should_compile(cuda, "off")
    # sdaa compiles when asked (Tecorigin names inductor as the card's backend); auto stays eager there.
    assert devices.should_compile(sdaa, "on") and not devices.should_compile(sdaa, "auto")
    assert sdaa.pin_memory and cuda.pin_memory and not cpu.pin_memory
    assert (sdaa.index, cuda.index, sdaa.compile_backend) == (2, 1, "inductor")
    # torch 2.0's DataLoader pins for CUDA unless told the device
    assert (sdaa.pin_memory_device, cuda.pin_memory_device, cpu.pin_memory_device) == ("sdaa", "", "")


def test_precision_resolution():
    cpu, cuda, sdaa = devices.make_backend("cpu"), devices.make_backend("cuda"), devices.make_backend("sdaa")
    yes, no = (lambda n: True), (lambda n: False)
    assert devices.resolve_precision(cpu, "auto", yes) == "bf16"
    assert devices.resolve_precision(cpu, "auto", no) == "fp32"
    assert devices.resolve_precision(cuda, "auto", yes) == "bf16"
    # sdaa: bf16 where the card has it, else fp16 (every card has it) with the loss scaler
    assert devices.resolve_precision(sdaa, "auto", yes) == "bf16"
    assert devices.resolve_precision(sdaa, "auto", no) == "fp16"
    assert devices.resolve_precision(sdaa, "fp16", no) == "fp16"
    with pytest.raises(CenterpointError, match="no native bf16; use fp16 or fp32"):
        devices.resolve_precision(sdaa, "bf16", no)
    with pytest.raises(CenterpointError, match="fp16 needs cuda or sdaa"):
        devices.resolve_precision(cpu, "fp16", yes)
    with pytest.raises(CenterpointError, match="no native bf16"):
        devices.resolve_precision(cpu, "bf16", no)


def test_autocast_context_on_cpu():
    cpu = devices.make_backend("cpu")
    with cpu.autocast("bf16"):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    with cpu.autocast("fp32"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_sdaa_probe_without_torch_sdaa_is_false():
    assert devices.available("sdaa") is False


def test_local_rank_beyond_the_visible_devices_is_a_clear_error():
    devices.check_local_rank("cuda", 1, 2)
    devices.check_local_rank("cpu", 7, 1)  # cpu processes share the one device
    with pytest.raises(CenterpointError, match=r"local rank 3 needs sdaa:3, but this machine shows 3 sdaa"):
        devices.check_local_rank("sdaa", 3, 3)
    with pytest.raises(CenterpointError, match="cuda:0.*0 cuda device"):
        devices.check_local_rank("cuda", 0, 0)
    assert devices.device_count("cpu") == 1


def test_compile_backend_resolution_names_what_torch_offers():
    sdaa, cuda = devices.make_backend("sdaa"), devices.make_backend("cuda")
    offered = lambda: ["aot_eager", "eager", "inductor"]  # noqa: E731
    assert devices.resolve_compile_backend(sdaa, None, offered) == "inductor"
    assert devices.resolve_compile_backend(cuda, "aot_eager", offered) == "aot_eager"
    with pytest.raises(CenterpointError, match="compile_backend=tvm.*offers aot_eager, eager, inductor"):
        devices.resolve_compile_backend(sdaa, "tvm", offered)
    assert "inductor" in devices.compile_backends() and "eager" in devices.compile_backends()


def test_a_backend_that_fails_to_compile_is_a_clear_error():
    import torch._dynamo

    def broken(gm, example_inputs):  # noqa: ANN001, ANN202 (a backend whose compiler fails)
        raise RuntimeError("this backend cannot compile")

    torch._dynamo.register_backend(broken, name="broken_for_test")
    step = devices.compile_step(lambda x: x * 2 + 1, "broken_for_test")
    with pytest.raises(CenterpointError, match="backend 'broken_for_test' failed.*offers.*inductor"):
        step(torch.ones(3))
    ok = devices.compile_step(lambda x: x * 2 + 1, "eager")
    assert torch.equal(ok(torch.ones(3)), torch.full((3,), 3.0)) and torch.equal(ok(torch.zeros(2)), torch.ones(2))


def test_visible_devices_variable_is_named_per_card():
    with pytest.raises(CenterpointError, match="SDAA_VISIBLE_DEVICES"):
        devices.check_local_rank("sdaa", 2, 1)
    with pytest.raises(CenterpointError, match="CUDA_VISIBLE_DEVICES"):
        devices.check_local_rank("cuda", 2, 1)


def test_cpu_seed_is_torch_manual_seed():
    devices.make_backend("cpu").manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))
