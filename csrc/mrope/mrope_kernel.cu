// Fused multimodal rotary embedding (Qwen2.5-VL mRoPE) for packed [N, H, D] tensors.
//
// Each thread owns one (token, head, frequency) triple: it reads the token's position on the axis
// that the frequency's section selects (t, h or w), forms the angle with the inverse frequency,
// and rotates the pair (d, d + D/2) in fp32. Nothing but q/k, the [3, N] positions and the [D/2]
// frequencies is read: no per-token cos/sin tables. inverse=true rotates by -angle (the backward).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

template <typename scalar_t, typename index_t>
__global__ void mrope_rotate_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    const index_t* __restrict__ positions, const float* __restrict__ inv_freq,
                                    int64_t num_tokens, int num_heads, int half, int section_t, int section_h,
                                    int64_t stride_xt, int64_t stride_xh, int64_t stride_ot, int64_t stride_oh,
                                    int64_t pos_stride, float sign) {
  const int64_t token = blockIdx.x;
  const int pairs = num_heads * half;
  for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < pairs; idx += gridDim.y * blockDim.x) {
    const int head = idx / half;
    const int d = idx - head * half;
    const int axis = d < section_t ? 0 : (d < section_t + section_h ? 1 : 2);
    const float angle = static_cast<float>(positions[axis * pos_stride + token]) * inv_freq[d];
    float s, c;
    sincosf(angle, &s, &c);
    s *= sign;
    const scalar_t* src = x + token * stride_xt + head * stride_xh + d;
    const float first = static_cast<float>(src[0]);
    const float second = static_cast<float>(src[half]);
    scalar_t* dst = out + token * stride_ot + head * stride_oh + d;
    dst[0] = static_cast<scalar_t>(first * c - second * s);
    dst[half] = static_cast<scalar_t>(second * c + first * s);
  }
}

template <typename scalar_t>
void launch(const at::Tensor& x, at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq,
            int section_t, int section_h, bool inverse) {
  const int64_t num_tokens = x.size(0);
  const int num_heads = static_cast<int>(x.size(1));
  const int half = static_cast<int>(x.size(2) / 2);
  const int threads = 256;
  const int pairs = num_heads * half;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>((pairs + threads - 1) / threads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float sign = inverse ? -1.0f : 1.0f;
  if (positions.scalar_type() == at::kLong) {
    mrope_rotate_kernel<scalar_t, int64_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
        num_tokens, num_heads, half, section_t, section_h, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        positions.stride(0), sign);
  } else {
    mrope_rotate_kernel<scalar_t, int32_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), positions.data_ptr<int32_t>(), inv_freq.data_ptr<float>(),
        num_tokens, num_heads, half, section_t, section_h, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        positions.stride(0), sign);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void mrope_rotate_cuda(const at::Tensor& x, at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq,
                       int64_t section_t, int64_t section_h, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(x, out, positions, inv_freq, section_t, section_h, inverse);
      break;
    case at::kHalf:
      launch<at::Half>(x, out, positions, inv_freq, section_t, section_h, inverse);
      break;
    case at::kBFloat16:
      launch<at::BFloat16>(x, out, positions, inv_freq, section_t, section_h, inverse);
      break;
    default:
      TORCH_CHECK(false, "mrope_rotate: unsupported dtype ", x.scalar_type());
  }
}
