// gati fused cache lookup: a learned cache's predictor and max-softmax
// selector for every row of a batch, reading the pooled features the block
// epilogue wrote (row stride `feat_stride`, first `dim` values used).
//
//   z_d      = (clean(f_d) - mean_d) * inv_std_d      (mean/inv_std optional;
//                                                      clean: non-finite -> 0)
//   h_j      = max(0, b1_j + sum_d w1[j,d] z_d)        (hidden > 0 only)
//   logit_k  = bias_k + sum_i weight[k,i] in_i         (in = h, or z)
//   p        = softmax(logit)
//   class    = first argmax p;  conf = p[class]
//   novelty guard (centroids optional): d2 = |z - centroid[class]|^2;
//     conf = 0 when radius2[class] < 0 (class never seen) or d2 > radius2[class]
//   hit      = conf >= threshold
//
// Outputs per row: hit (0/1), class, conf, and the probabilities (optional,
// rows x classes). One thread block per row; dynamic shared memory holds
// dim + hidden + classes + blockDim.x floats. blockDim.x: power of two.

__device__ __forceinline__ float gati_clean(float v) {
    return isfinite(v) ? v : 0.0f;
}

extern "C" __global__ void gati_cache_lookup(
    const float* __restrict__ features, int feat_stride,
    const float* __restrict__ mean, const float* __restrict__ inv_std,
    const float* __restrict__ w1, const float* __restrict__ b1, int hidden,
    const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ centroids, const float* __restrict__ radius2,
    int rows, int dim, int classes, float threshold,
    int* __restrict__ hit, int* __restrict__ cls, float* __restrict__ conf,
    float* __restrict__ probs)
{
    extern __shared__ float smem[];
    float* z = smem;
    float* h = z + dim;
    float* logit = h + hidden;
    float* red = logit + classes;
    const int row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* f = features + (long)row * feat_stride;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float v = gati_clean(f[d]);
        if (mean) {
            v = (v - mean[d]) * inv_std[d];
        }
        z[d] = v;
    }
    __syncthreads();
    const float* in = z;
    int width = dim;
    if (hidden > 0) {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            float acc = b1[j];
            const float* w = w1 + (long)j * dim;
            for (int d = 0; d < dim; ++d) {
                acc += w[d] * z[d];
            }
            h[j] = fmaxf(acc, 0.0f);
        }
        __syncthreads();
        in = h;
        width = hidden;
    }
    for (int k = threadIdx.x; k < classes; k += blockDim.x) {
        float acc = bias[k];
        const float* w = weight + (long)k * width;
        for (int i = 0; i < width; ++i) {
            acc += w[i] * in[i];
        }
        logit[k] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // Serial over classes on purpose: the same order as the CPU reference
        // (first maximum wins, the same summation order for the softmax).
        float m = logit[0];
        for (int k = 1; k < classes; ++k) {
            m = fmaxf(m, logit[k]);
        }
        float total = 0.0f;
        for (int k = 0; k < classes; ++k) {
            float e = expf(logit[k] - m);
            logit[k] = e;
            total += e;
        }
        int best = 0;
        float best_p = -1.0f;
        for (int k = 0; k < classes; ++k) {
            float p = logit[k] / total;
            logit[k] = p;
            if (p > best_p) {
                best_p = p;
                best = k;
            }
        }
        red[0] = best_p;
        red[1] = __int_as_float(best);
    }
    __syncthreads();
    const int best = __float_as_int(red[1]);
    float c = red[0];
    if (probs) {
        for (int k = threadIdx.x; k < classes; k += blockDim.x) {
            probs[(long)row * classes + k] = logit[k];
        }
    }
    if (centroids) {
        __syncthreads();
        float part = 0.0f;
        const float* cen = centroids + (long)best * dim;
        for (int d = threadIdx.x; d < dim; d += blockDim.x) {
            float e = z[d] - cen[d];
            part += e * e;
        }
        red[threadIdx.x] = part;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) {
                red[threadIdx.x] += red[threadIdx.x + half];
            }
            __syncthreads();
        }
        const float r = radius2[best];
        if (r < 0.0f || red[0] > r) {
            c = 0.0f;
        }
    }
    if (threadIdx.x == 0) {
        cls[row] = best;
        conf[row] = c;
        hit[row] = c >= threshold ? 1 : 0;
    }
}
