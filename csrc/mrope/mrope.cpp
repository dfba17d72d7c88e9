// Python binding of the fused mRoPE kernel, with loud input checks: a wrong tensor fails here with
// a message naming the argument, never inside the kernel.
#include <torch/extension.h>

void mrope_rotate_cuda(const at::Tensor& x, at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq,
                       int64_t section_t, int64_t section_h, bool inverse);

namespace {

void mrope_rotate(const at::Tensor& x, at::Tensor out, const at::Tensor& positions, const at::Tensor& inv_freq,
                  int64_t section_t, int64_t section_h, bool inverse) {
  TORCH_CHECK(x.is_cuda(), "mrope_rotate: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(out.device() == x.device() && positions.device() == x.device() && inv_freq.device() == x.device(),
              "mrope_rotate: x, out, positions and inv_freq must be on the same device");
  TORCH_CHECK(x.dim() == 3, "mrope_rotate: x must be [tokens, heads, head_dim], got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1, "mrope_rotate: x must have unit stride on head_dim");
  TORCH_CHECK(x.size(2) % 2 == 0, "mrope_rotate: head_dim must be even, got ", x.size(2));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "mrope_rotate: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.stride(2) == 1,
              "mrope_rotate: out must match x in shape and dtype with unit stride on head_dim");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == 3 && positions.size(1) == x.size(0),
              "mrope_rotate: positions must be [3, tokens] = [3, ", x.size(0), "], got ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
              "mrope_rotate: positions must be int64 or int32, got ", positions.scalar_type());
  TORCH_CHECK(positions.stride(1) == 1, "mrope_rotate: positions rows must be contiguous");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == x.size(2) / 2 && inv_freq.scalar_type() == at::kFloat &&
                  inv_freq.is_contiguous(),
              "mrope_rotate: inv_freq must be contiguous float32 [head_dim / 2] = [", x.size(2) / 2, "]");
  TORCH_CHECK(section_t >= 0 && section_h >= 0 && section_t + section_h <= x.size(2) / 2,
              "mrope_rotate: sections (", section_t, ", ", section_h, ") exceed head_dim / 2");
  if (x.numel() == 0) return;
  mrope_rotate_cuda(x, out, positions, inv_freq, section_t, section_h, inverse);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mrope_rotate", &mrope_rotate,
        "Rotate [tokens, heads, head_dim] by Qwen2.5-VL mRoPE angles computed from [3, tokens] positions",
        py::arg("x"), py::arg("out"), py::arg("positions"), py::arg("inv_freq"), py::arg("section_t"),
        py::arg("section_h"), py::arg("inverse") = false);
}
