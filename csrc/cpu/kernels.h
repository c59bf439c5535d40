// Entry points of the CPU kernels, declared once per instruction-set namespace (pfp_avx512,
// pfp_avx2, pfp_scalar); csrc/cpu/dispatch.cpp picks the namespace at run time.
// Contracts (shapes, dtypes, layout) sit above each definition in csrc/cpu/<family>.cpp; the Python
// wrappers in pyfastpeft/ops/<family>.py have checked them before any pointer gets here.
#pragma once
#include <cstdint>

#include "native_types.h"

#define PFP_DECLARE_CPU_KERNELS(ns)                                                                                    \
  namespace ns {                                                                                                       \
  void rmsnorm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n, int x_dtype,   \
                       int weight_dtype, int y_dtype, double eps, double offset, int casting_mode, int nthreads);      \
  void rmsnorm_backward(const void* dy, const void* x, const void* weight, const void* rstd, void* dx, void* dw,       \
                        int64_t rows, int64_t n, int x_dtype, int weight_dtype, int dy_dtype, double offset,           \
                        int casting_mode, int64_t num_partials, int nthreads);                                         \
  void swiglu_forward(const void* gate, const void* up, void* out, int64_t numel, int dtype, int nthreads);            \
  void swiglu_backward(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t numel,        \
                       int dtype, int nthreads);                                                                       \
  void rope(const void* q, const void* k, void* q_out, void* k_out, const void* cos, const void* sin,                  \
            pfp::Strides3 q_strides, pfp::Strides3 k_strides, pfp::Strides3 q_out_strides,                             \
            pfp::Strides3 k_out_strides, int64_t cos_batch_stride, int64_t cos_seq_stride, int64_t batch, int64_t seq, \
            int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t rot_dim, int dtype, bool interleaved,          \
            bool backward, int nthreads);                                                                              \
  void nf4_quantize(const void* w, int w_dtype, uint8_t* packed, float* absmax, int64_t numel, int64_t blocksize,      \
                    const float* code, int nthreads);                                                                  \
  void nf4_dequantize(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,         \
                      int64_t start, int64_t count, int64_t blocksize, int nthreads);                                  \
  void nf4_dequantize_cols(const uint8_t* packed, const float* absmax, const float* code, void* out, int out_dtype,    \
                           int64_t rows, int64_t k, int64_t col_start, int64_t cols, int64_t blocksize, int nthreads); \
  void nf4_matmul(const void* x, const uint8_t* packed, const float* absmax, const float* code, void* out, int64_t m,  \
                  int64_t n, int64_t k, int64_t blocksize, int nthreads);                                              \
  void nf4_matmul_grad_input(const void* dy, const uint8_t* packed, const float* absmax, const float* code, void* dx,  \
                             int64_t m, int64_t n, int64_t k, int64_t blocksize, int nthreads);                        \
  void lora_nf4_matmul(const void* x, const uint8_t* packed, const float* absmax, const float* code, const void* xa,   \
                       const void* lora_b, double scaling, void* out, int64_t m, int64_t n, int64_t k, int64_t rank,   \
                       int64_t blocksize, int nthreads);                                                               \
  void nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,             \
                const void* bias, int bias_dtype, void* out, int64_t m, int64_t n, int64_t k, int64_t blocksize,       \
                int nthreads);                                                                                         \
  void int8_quantize(const void* x, int x_dtype, int8_t* q, float* stats, uint8_t* outlier_flags, int64_t m,           \
                     int64_t k, int axis, double threshold, int nthreads);                                             \
  void int8_matmul(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k, int nthreads);       \
  void int8_mm_dequant(const int32_t* c, const float* row_stats, const float* col_stats, const void* bias,             \
                       int bias_dtype, const float* addend, void* out, int out_dtype, int64_t m, int64_t n,            \
                       int nthreads);                                                                                  \
  void int8_gemv(const int8_t* q, const float* row_stats, const int8_t* w, const float* col_stats, const void* bias,   \
                 int bias_dtype, const float* addend, void* out, int out_dtype, int64_t m, int64_t n, int64_t k,       \
                 const int64_t* outlier_cols, int64_t outlier_count, const float* outlier_x, bool outlier_bf16,        \
                 int nthreads);                                                                                        \
  void int8_dequantize_rows(const int8_t* q, const float* stats, void* out, int out_dtype, int64_t rows, int64_t k,    \
                            int nthreads);                                                                             \
  void int8_dequantize_cols(const int8_t* w, const float* stats, const int64_t* cols, void* out, int out_dtype,        \
                            int64_t n, int64_t k, int64_t count, int nthreads);                                        \
  void lora_dropout(const void* src, void* dst, int64_t numel, int dtype, int64_t seed, int64_t offset,                \
                    float threshold, float keep_scale, double alpha, bool accumulate, int nthreads);                   \
  void lora_branch_grads(const void* x, const void* grad_xa, const void* a, void* dx, void* grad_a, const void* keep,  \
                         int64_t m, int64_t k, int64_t rank, int dtype, bool dropout, int64_t seed, int64_t offset,    \
                         float threshold, float keep_scale, double scaling, int nthreads);                             \
  void lora_up_grads(const void* dy, const void* b, const void* xa, void* grad_xa, void* grad_b, int64_t m, int64_t n, \
                     int64_t rank, int dtype, double scaling, int nthreads);                                           \
  void lora_down(const void* x, const void* a, void* xa, void* keep, int64_t m, int64_t k, int64_t rank, int dtype,    \
                 bool dropout, int64_t seed, int64_t offset, float threshold, float keep_scale, int nthreads);         \
  void lora_nf4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* absmax, const float* code,        \
                     const void* bias, int bias_dtype, const void* lora_a, const void* lora_b, void* xa,               \
                     double scaling, bool dropout, int64_t seed, int64_t offset, float threshold, float keep_scale,    \
                     void* out, int64_t m, int64_t n, int64_t k, int64_t rank, int64_t blocksize, int nthreads);       \
  void quantize_affine(const void* x, int x_dtype, void* codes, float* scale, int32_t* zero_point, int64_t outer,      \
                       int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint, int nthreads);    \
  void quantize_static(const void* x, int x_dtype, const float* scale, const int32_t* zero_point, void* codes,         \
                       int64_t outer, int64_t channels, int64_t inner, int64_t blocksize, int bits, bool zeropoint,    \
                       int nthreads);                                                                                  \
  void dequantize_affine(const void* codes, bool codes_signed, const float* scale, const int32_t* zero_point,          \
                         void* out, int out_dtype, int64_t outer, int64_t channels, int64_t inner, int64_t blocksize,  \
                         int nthreads);                                                                                \
  void lora_dropout_rows(const void* src, void* dst, const int64_t* row_index, int64_t count, int64_t cols,            \
                         bool scatter, int dtype, int64_t seed, int64_t offset, float threshold, float keep_scale,     \
                         double alpha, bool accumulate, int nthreads);                                                 \
  void flce_rows(void* logits, const int64_t* labels, const void* grad_weight, const void* z_grad_weight,              \
                 const void* class_weight, void* loss, void* lse, int64_t rows, int64_t vocab, int dtype,              \
                 int logits_dtype, int64_t ignore_index, double label_smoothing, double softcap, int nthreads);        \
  void distill_rows(void* student, void* teacher, const int64_t* labels, const void* grad_weight, void* loss,          \
                    int64_t rows, int64_t vocab, int dtype, int64_t ignore_index, double beta, double temperature,     \
                    double hard_label_weight, int nthreads);                                                           \
  void blockwise_quantize(const void* x, int x_dtype, const float* code, uint8_t* codes, float* absmax, int64_t numel, \
                          int64_t blocksize, int nthreads);                                                            \
  void blockwise_dequantize(const uint8_t* codes, const float* absmax, const float* code, void* out, int out_dtype,    \
                            int64_t numel, int64_t blocksize, int nthreads);                                           \
  void adam8bit_step(const int64_t* p, const int64_t* g, const int64_t* state1, const int64_t* state2,                 \
                     const int64_t* absmax1, const int64_t* absmax2, const int64_t* numels, int64_t count, int dtype,  \
                     const float* code1, const float* code2, double step_size, double correction2_eps, double beta1,   \
                     double beta2, double decay, bool apply_decay, int nthreads);                                      \
  void lion8bit_step(const int64_t* p, const int64_t* g, const int64_t* state1, const int64_t* absmax1,                \
                     const int64_t* numels, int64_t count, int dtype, const float* code1, double lr, double beta1,     \
                     double beta2, double decay, bool apply_decay, int nthreads);                                      \
  void blockwise_table_exact(const float* code, int32_t* exact);                                                       \
  void dora_scale(const void* z, const void* scale, const void* addend, int addend_kind, void* y, int64_t rows,        \
                  int64_t cols, int dtype, int nthreads);                                                              \
  void dora_norm(const void* w, int w_dtype, const void* lora_A, const void* lora_B, int compute_dtype,                \
                 double scaling, void* norm, int64_t rows, int64_t in_features, int64_t rank, int nthreads);           \
  void dora_grad(const void* dy, const void* z, const void* scale, void* dy_scaled, void* column_sum, int64_t rows,    \
                 int64_t cols, int dtype, int nthreads);                                                               \
  void attention_forward(const void* q, const void* k, const void* v, void* out, void* lse, pfp::Strides3 q_strides,   \
                         pfp::Strides3 k_strides, pfp::Strides3 v_strides, pfp::Strides3 out_strides, int64_t batch,   \
                         int64_t heads, int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim, int dtype,  \
                         double scale, bool causal, int nthreads);                                                     \
  void attention_backward(const void* dout, const void* q, const void* k, const void* v, const void* out,              \
                          const void* lse, void* dq, void* dk, void* dv, pfp::Strides3 dout_strides,                   \
                          pfp::Strides3 q_strides, pfp::Strides3 k_strides, pfp::Strides3 v_strides,                   \
                          pfp::Strides3 out_strides, pfp::Strides3 dq_strides, pfp::Strides3 dk_strides,               \
                          pfp::Strides3 dv_strides, int64_t batch, int64_t heads, int64_t kv_heads, int64_t q_len,     \
                          int64_t kv_len, int64_t head_dim, int dtype, double scale, bool causal, int nthreads);       \
  }

PFP_DECLARE_CPU_KERNELS(pfp_avx512)
PFP_DECLARE_CPU_KERNELS(pfp_avx2)
PFP_DECLARE_CPU_KERNELS(pfp_scalar)
