// gati layout kernels the GPU executor needs besides cuDNN/cuBLAS.
//
// gati_nhwc_to_nchw: y[n,c,h,w] = x[n,h,w,c] (an NHWC model input, once per batch).
// gati_row_bias_act: y[r,k] = act(y[r,k] + bias[k]) for GEMM outputs whose
//   epilogue has no pooled features (grid-stride; act as in the epilogue).

extern "C" __global__ void gati_nhwc_to_nchw(
    const float* __restrict__ x, float* __restrict__ y,
    int rows, int channels, int height, int width)
{
    const long total = (long)rows * channels * height * width;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int w = (int)(i % width);
        long t = i / width;
        const int h = (int)(t % height);
        t /= height;
        const int c = (int)(t % channels);
        const long n = t / channels;
        y[i] = x[((n * height + h) * width + w) * channels + c];
    }
}

extern "C" __global__ void gati_row_bias_act(
    float* __restrict__ y, const float* __restrict__ bias, int rows, int cols, int act)
{
    const long total = (long)rows * cols;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        float v = y[i] + (bias ? bias[i % cols] : 0.0f);
        if (act == 1) {
            v = fmaxf(v, 0.0f);
        } else if (act == 2) {
            v = fminf(fmaxf(v, 0.0f), 6.0f);
        }
        y[i] = v;
    }
}

// gati_pad2d: y[p, i, j] = x[p, i - top, j - left] inside x, else 0, for each
// of `planes` (rows × channels) planes; (oh, ow) is the padded size. Lets an
// asymmetric convolution padding (TF "same" with stride 2) become an explicit
// pad + an unpadded convolution, which cuDNN supports.
extern "C" __global__ void gati_pad2d(
    const float* __restrict__ x, float* __restrict__ y,
    int planes, int height, int width, int top, int left, int oh, int ow)
{
    const long total = (long)planes * oh * ow;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int j = (int)(i % ow);
        long t = i / ow;
        const int r = (int)(t % oh);
        const long p = t / oh;
        const int sr = r - top, sc = j - left;
        y[i] = (sr >= 0 && sr < height && sc >= 0 && sc < width) ? x[(p * height + sr) * width + sc] : 0.0f;
    }
}
