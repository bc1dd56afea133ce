// gati fused block epilogue.
//
// One pass over a block's pre-activation output x (rows x channels x spatial,
// NCHW with spatial = H*W; spatial = 1 for a GEMM's rows x features):
//
//   v = x[n,c,s] + bias[c] + residual[n,c,s]          (bias, residual optional)
//   v = act(v)                                        (0 none, 1 ReLU, 2 ReLU6)
//   y[n,c,s] = v * post_scale[c] + post_shift[c]      (optional: a BatchNorm
//                                                      that follows the activation)
//   pooled[n * pooled_stride + c] = mean_s y[n,c,s]   (optional: the cut's features)
//
// One thread block per (n, c) plane; its threads stride over the plane and
// reduce the plane's sum in shared memory, so the pooled features cost no
// second read of y. `y` may alias `x` (in place). blockDim.x must be a power
// of two <= 1024.

extern "C" __global__ void gati_block_epilogue(
    const float* x,
    const float* __restrict__ bias,
    const float* __restrict__ residual,
    const float* __restrict__ post_scale,
    const float* __restrict__ post_shift,
    float* y,
    float* __restrict__ pooled,
    int rows, int channels, int spatial, int act, int pooled_stride)
{
    extern __shared__ float partial[];
    const long plane = blockIdx.x;
    if (plane >= (long)rows * channels) {
        return;
    }
    const int c = (int)(plane % channels);
    const long n = plane / channels;
    const long base = plane * spatial;
    const float b = bias ? bias[c] : 0.0f;
    const float scale = post_scale ? post_scale[c] : 1.0f;
    const float shift = post_shift ? post_shift[c] : 0.0f;
    float sum = 0.0f;
    for (int s = threadIdx.x; s < spatial; s += blockDim.x) {
        float v = x[base + s] + b;
        if (residual) {
            v += residual[base + s];
        }
        if (act == 1) {
            v = fmaxf(v, 0.0f);
        } else if (act == 2) {
            v = fminf(fmaxf(v, 0.0f), 6.0f);
        }
        v = v * scale + shift;
        y[base + s] = v;
        sum += v;
    }
    if (!pooled) {
        return;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        pooled[n * pooled_stride + c] = partial[0] / (float)spatial;
    }
}
