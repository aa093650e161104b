import pytest
import torch

from patcher import kernels

TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("n,d", [(5, 3), (123, 127), (1, 64), (257, 5)])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_second_moment_matches_float64(n, d, dtype):
    x = torch.randn(n, d).to(dtype)
    out = kernels.second_moment(x)
    expected = x.double().T @ x.double()
    assert out.dtype == torch.float32 and out.shape == (d, d)
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel < TOLERANCES[dtype]


def test_second_moment_accumulates_into_out():
    a, b = torch.randn(7, 9), torch.randn(11, 9)
    out = torch.zeros(9, 9)
    kernels.second_moment(a, out)
    returned = kernels.second_moment(b, out)
    assert returned is out
    expected = a.double().T @ a.double() + b.double().T @ b.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_second_moment_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        kernels.second_moment(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        kernels.second_moment(torch.randn(4, 3), torch.zeros(3, 3, dtype=torch.float64))
