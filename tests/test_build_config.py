"""setup.py's build decisions (legw_fused/_build_config.py), checked with fake toolkits: no compiler runs."""

import os
import stat

import pytest

from legw_fused import _build_config as bc


def fake_toolkit(root, release=None):
    """A toolkit folder; with `release` ("12.0") its nvcc answers --version as a real one does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    if release is None:
        nvcc.write_text("#!/bin/sh\n")
    else:
        nvcc.write_text(f'#!/bin/sh\necho "nvcc: NVIDIA (R) Cuda compiler driver"\n'
                        f'echo "Cuda compilation tools, release {release}, V{release}.140"\n')
        nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH", "LEGW_FUSED_SKIP_CUDA_BUILD", "LEGW_FUSED_FORCE_CUDA_BUILD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(bc, "_is_toolkit", lambda folder, real=bc._is_toolkit: real(folder)
                        and not str(folder).startswith("/usr/local/cuda"))  # ignore this machine's toolkit
    return monkeypatch


def test_skip_flag_wins(clean_env, tmp_path):
    clean_env.setenv("CUDA_HOME", str(fake_toolkit(tmp_path / "cuda")))
    clean_env.setenv("LEGW_FUSED_SKIP_CUDA_BUILD", "1")
    assert bc.cuda_decision("13.0") == (False, None, "LEGW_FUSED_SKIP_CUDA_BUILD=1")


def test_cpu_torch_builds_cpu_only_and_force_fails_with_reason(clean_env):
    with_cuda, home, reason = bc.cuda_decision(None)
    assert not with_cuda and home is None and "CPU-only build" in reason
    clean_env.setenv("LEGW_FUSED_FORCE_CUDA_BUILD", "1")
    with pytest.raises(bc.BuildConfigError, match="CPU-only build"):
        bc.cuda_decision(None)


def test_cuda_home_is_used_and_checked(clean_env, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    clean_env.setenv("CUDA_HOME", str(home))
    assert bc.cuda_decision("13.0") == (True, str(home), f"torch CUDA 13.0, toolkit {home} (found via $CUDA_HOME)")
    clean_env.setenv("CUDA_HOME", str(tmp_path))
    with_cuda, _, reason = bc.cuda_decision("13.0")
    assert not with_cuda and "$CUDA_HOME" in reason and "not a CUDA toolkit" in reason
    clean_env.setenv("LEGW_FUSED_FORCE_CUDA_BUILD", "1")
    with pytest.raises(bc.BuildConfigError, match="not a CUDA toolkit"):
        bc.cuda_decision("13.0")


def test_toolkit_found_through_an_nvcc_wrapper_script(clean_env, tmp_path):
    # As on our CI machines: the nvcc on PATH is a script outside the toolkit that execs the real one.
    home = fake_toolkit(tmp_path / "toolkits" / "cuda-13.0")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\necho "#$ TOP={home}/bin/.." >&2\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    clean_env.setenv("PATH", str(wrapper_dir))
    with_cuda, found, reason = bc.cuda_decision("13.0")
    assert with_cuda and found == os.path.normpath(f"{home}/bin/..") and "TOP=" in reason


def test_nvcc_older_than_12_1_skips_cuda_sources_and_force_fails(clean_env, tmp_path):
    # The CUDA step kernel's 24,720-byte parameters need nvcc >= 12.1.
    old = fake_toolkit(tmp_path / "cuda-12.0", release="12.0")
    assert bc.nvcc_version(str(old)) == (12, 0)
    clean_env.setenv("CUDA_HOME", str(old))
    with_cuda, home, reason = bc.cuda_decision("12.6")
    assert not with_cuda and home is None
    assert "nvcc 12.0" in reason and "nvcc >= 12.1" in reason and str(old) in reason
    clean_env.setenv("LEGW_FUSED_FORCE_CUDA_BUILD", "1")
    with pytest.raises(bc.BuildConfigError, match=r"nvcc 12\.0; the CUDA kernels need nvcc >= 12\.1"):
        bc.cuda_decision("12.6")


@pytest.mark.parametrize("release", ["12.1", "13.0"])
def test_nvcc_12_1_and_newer_build_cuda_sources(clean_env, tmp_path, release):
    home = fake_toolkit(tmp_path / f"cuda-{release}", release=release)
    clean_env.setenv("CUDA_HOME", str(home))
    clean_env.setenv("LEGW_FUSED_FORCE_CUDA_BUILD", "1")
    assert bc.cuda_decision("13.0")[:2] == (True, str(home))


def test_no_toolkit_anywhere(clean_env):
    with_cuda, home, reason = bc.cuda_decision("13.0")
    assert not with_cuda and home is None and "no CUDA toolkit was found" in reason


def test_cusparse_headers_from_nvidia_wheels(tmp_path):
    torch_dir = tmp_path / "site-packages" / "torch"
    torch_dir.mkdir(parents=True)
    inc = tmp_path / "site-packages" / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    (inc / "cusparse.h").write_text("")
    assert bc.extra_cuda_include_dirs(torch_dir) == [str(inc)]
