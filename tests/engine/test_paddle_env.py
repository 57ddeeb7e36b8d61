"""The CPU is read at run time and the math-library environment follows from it."""

import os

from pipeline.engine import paddle_env

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n"
INTEL = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
         "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n")


def test_cpu_info_reads_vendor_model_and_isa_flags(tmp_path):
    (tmp_path / "amd").write_text(AMD)
    (tmp_path / "intel").write_text(INTEL)
    assert paddle_env.cpu_info(str(tmp_path / "amd")) == {"vendor": "AuthenticAMD", "model": "AMD EPYC 7B13",
                                                          "flags": ["avx2"]}
    intel = paddle_env.cpu_info(str(tmp_path / "intel"))
    assert intel["vendor"] == "GenuineIntel" and intel["flags"] == [f for f in paddle_env._FLAGS if f != "avx_vnni"]
    assert paddle_env.cpu_info(str(tmp_path / "missing")) == {"vendor": "", "model": "", "flags": []}


def test_mkl_cpu_type_is_forced_on_amd_only(monkeypatch, tmp_path):
    read = paddle_env.cpu_info
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(paddle_env, "cpu_info", lambda: read(str(fake)))
    for text, want in ((AMD, "5"), (INTEL, None)):
        fake.write_text(text)
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
        paddle_env.set_math_library_env()
        assert os.environ.get("MKL_DEBUG_CPU_TYPE") == want
    fake.write_text(AMD)
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "0")  # the user's own setting is kept
    paddle_env.set_math_library_env()
    assert os.environ["MKL_DEBUG_CPU_TYPE"] == "0"
