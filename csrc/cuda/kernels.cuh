// Host entry points of the CUDA kernels. Contracts (shapes, dtypes, layout) sit above each definition
// in csrc/cuda/<family>.cu; the Python wrappers in pyfastpeft/ops/<family>.py have checked them.
// Every entry point makes `device` current for the call, launches on `stream` only (no allocation,
// no synchronization), throws std::runtime_error on a CUDA error and std::invalid_argument on an
// unsupported dtype, and returns without launching when there is nothing to compute.
//
// Each takes the parameters of the CPU entry point of the same name (csrc/cpu/kernels.h), with (stream, device)
// in place of nthreads, so one Python call (pyfastpeft/_native.py launch) serves both; except nf4_quantize (the
// GPU kernel searches the code's sorted midpoints instead of the code) and nf4_dequantize (the whole tensor,
// where the CPU kernel takes a [start, start + count) range for its tiled callers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "native_types.h"

namespace pfp_cuda {

void rmsnorm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n, int x_dtype,
                     int weight_dtype, int y_dtype, double eps, double offset, int casting_mode, cudaStream_t stream,
                     int device);
void rmsnorm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dw_partial,
                      int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,
                      int casting_mode, int64_t num_partials, cudaStream_t stream, int device);
void swiglu_forward(const void* gate, const void* up, void* out, int64_t numel, int dtype, cudaStream_t stream,
                    int device);
void swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t numel, int dtype,
                     cudaStream_t stream, int device);
void rope(const void* q, const void* k, void* q_out, void* k_out, const void* cos, const void* sin,
          pfp::Strides3 q_strides, pfp::Strides3 k_strides, pfp::Strides3 q_out_strides, pfp::Strides3 k_out_strides,
          int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch, int64_t seq, int64_t q_heads,
          int64_t k_heads, int64_t head_dim, int64_t rot_dim, int dtype, bool interleaved, bool backward,
          cudaStream_t stream, int device);
void int8_quantize(const void* x, int x_dtype, int8_t* q, float* stats, int* flags, int64_t m, int64_t k, int axis,
                   double threshold, cudaStream_t stream, int device);
void int8_mm_dequant(const int32_t* c, const float* row_stats, const float* col_stats, const void* bias, int bias_dtype,
                     const float* addend, void* out, int out_dtype, int64_t m, int64_t n, cudaStream_t stream,
                     int device);
void int8_gemv(const int8_t* q, const float* row_stats, const int8_t* w, const float* col_stats, const void* bias,
               int bias_dtype, const float* addend, void* out, int out_dtype, int64_t m, int64_t n, int64_t k,
               const int64_t* outlier_cols, int64_t outlier_count, const float* outlier_x, bool outlier_bf16,
               cudaStream_t stream, int device);
void int8_dequantize_rows(const int8_t* q, const float* stats, void* out, int out_dtype, int64_t rows, int64_t k,
                          cudaStream_t stream, int device);
void nf4_quantize(const void* w, int w_dtype, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,
                  const float* midpoints, const int32_t* order, cudaStream_t stream, int device);
void nf4_dequantize(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,
                    int64_t numel, int64_t blocksize, cudaStream_t stream, int device);
void nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,
              const void* bias, int bias_dtype, void* out, int64_t m, int64_t n, int64_t k, int64_t blocksize,
              cudaStream_t stream, int device);
void flce_rows(void* logits, const int64_t* labels, const void* grad_weights, const void* z_grad_weights,
               const void* class_weight, void* loss, void* lse, int64_t rows, int64_t vocab, int dtype,
               int logits_dtype, int64_t ignore_index, double label_smoothing, double softcap, cudaStream_t stream,
               int device);
void distill_rows(void* student, void* teacher, const int64_t* labels, const void* grad_weights, void* loss,
                  int64_t rows, int64_t vocab, int dtype, int64_t ignore_index, double beta, double temperature,
                  double hard_label_weight, cudaStream_t stream, int device);

}  // namespace pfp_cuda
