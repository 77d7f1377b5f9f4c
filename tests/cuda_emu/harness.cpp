#include "kernels.cuh"
using namespace fastattn::cuda;
extern "C" {
int ln_fwd(int dt, const void* x, const void* r, const float* w, const float* b, void* out, void* sum,
           float* mean, float* rstd, int64_t N, int64_t M, float eps) {
  return layer_norm_fwd(DType(dt), x, r, w, b, out, sum, mean, rstd, N, M, eps, nullptr);
}
int64_t ln_ws(int64_t N, int64_t M, int nw, int nb) { return layer_norm_bwd_workspace(N, M, nw, nb); }
int ln_bwd(int dt, const void* dout, const void* x, const float* w, const float* mean, const float* rstd,
           const void* dsum, void* dx, float* dw, float* db, float* ws, int64_t N, int64_t M) {
  return layer_norm_bwd(DType(dt), dout, x, w, mean, rstd, dsum, dx, dw, db, ws, N, M, nullptr);
}
int rms_fwd(int dt, const void* x, const void* r, const float* c, void* out, void* sum, float* rstd,
            int64_t N, int64_t M, float eps, int cast) {
  return rms_norm_fwd(DType(dt), x, r, c, out, sum, rstd, N, M, eps, cast, nullptr);
}
int64_t rms_ws(int64_t N, int64_t M, int nw) { return rms_norm_bwd_workspace(N, M, nw); }
int rms_bwd(int dt, const void* dout, const void* x, const float* c, const float* rstd, const void* dsum,
            void* dx, float* dw, float* ws, int64_t N, int64_t M, int cast) {
  return rms_norm_bwd(DType(dt), dout, x, c, rstd, dsum, dx, dw, ws, N, M, cast, nullptr);
}
int gelu_fwd(int dt, const void* x, const float* b, void* out, int64_t N, int64_t M, int t) {
  return bias_gelu_fwd(DType(dt), x, b, out, N, M, t, nullptr);
}
int64_t gelu_ws(int64_t N, int64_t M, int nb) { return bias_gelu_bwd_workspace(N, M, nb); }
int gelu_bwd(int dt, const void* dout, const void* x, const float* b, void* dx, float* db, float* ws,
             int64_t N, int64_t M, int t) {
  return bias_gelu_bwd(DType(dt), dout, x, b, dx, db, ws, N, M, t, nullptr);
}
int gated_fwd(int dt, int act, const void* g, int64_t ldg, const void* u, int64_t ldu, void* h,
              int64_t N, int64_t H) {
  GatedActFwdArgs a{g, ldg, u, ldu, h, N, H};
  return gated_act_fwd(DType(dt), GatedAct(act), a, nullptr);
}
int gated_bwd(int dt, int act, const void* dh, int64_t ldd, const void* g, int64_t ldg, const void* u,
              int64_t ldu, void* dg, void* du, int64_t ldo, int64_t N, int64_t H) {
  GatedActBwdArgs a{dh, ldd, g, ldg, u, ldu, dg, du, ldo, N, H};
  return gated_act_bwd(DType(dt), GatedAct(act), a, nullptr);
}
// impl: 0 = attention_fwd (what the bindings call), 1 = attention_fwd_simple, 2 = attention_fwd_fa2.
int attn_fwd(int impl, int dt, const void* q, const void* k, const void* v, const int64_t* st,
             const uint8_t* mask, int64_t msb, void* out, float* lse, const int* sh, int causal,
             float scale, double p, uint64_t seed, uint64_t offset) {
  AttentionFwdArgs a{};
  a.q = q; a.k = k; a.v = v;
  a.q_stride = {st[0], st[1], st[2]}; a.k_stride = {st[3], st[4], st[5]}; a.v_stride = {st[6], st[7], st[8]};
  a.key_padding_mask = mask; a.mask_stride_b = msb; a.out = out; a.lse = lse;
  a.B = sh[0]; a.Hq = sh[1]; a.Hkv = sh[2]; a.Tq = sh[3]; a.Tk = sh[4]; a.D = sh[5];
  a.causal = causal; a.scale = scale; a.dropout_p = static_cast<float>(p); a.dropout_threshold = dropout_threshold_of(p); a.seed = seed; a.offset = offset;
  if (impl == 1) return attention_fwd_simple(DType(dt), a, nullptr);
  if (impl == 2) return attention_fwd_fa2(DType(dt), a, nullptr);
  return attention_fwd(DType(dt), a, nullptr);
}
// impl: 0 = attention_bwd (what the bindings call), 1 = attention_bwd_simple, 2 = attention_bwd_fa2.
int attn_bwd(int impl, int dt, const void* dout, const void* q, const void* k, const void* v, const void* out,
             const float* lse, const int64_t* st, const uint8_t* mask, int64_t msb, void* dq, void* dk,
             void* dv, float* delta, const int* sh, int causal, float scale, double p, uint64_t seed,
             uint64_t offset) {
  AttentionBwdArgs a{};
  a.dout = dout; a.q = q; a.k = k; a.v = v; a.out = out; a.lse = lse;
  a.dout_stride = {st[0], st[1], st[2]}; a.q_stride = {st[3], st[4], st[5]};
  a.k_stride = {st[6], st[7], st[8]}; a.v_stride = {st[9], st[10], st[11]};
  a.out_stride = {st[12], st[13], st[14]};
  a.key_padding_mask = mask; a.mask_stride_b = msb; a.dq = dq; a.dk = dk; a.dv = dv; a.delta = delta;
  a.B = sh[0]; a.Hq = sh[1]; a.Hkv = sh[2]; a.Tq = sh[3]; a.Tk = sh[4]; a.D = sh[5];
  a.causal = causal; a.scale = scale; a.dropout_p = static_cast<float>(p); a.dropout_threshold = dropout_threshold_of(p); a.seed = seed; a.offset = offset;
  std::vector<float> ws(attention_bwd_workspace(DType(dt), a.B, a.Hq, a.Tq, a.D), NAN);
  a.dq_accum = ws.empty() ? nullptr : ws.data();
  if (impl == 1) return attention_bwd_simple(DType(dt), a, nullptr);
  if (impl == 2) return attention_bwd_fa2(DType(dt), a, nullptr);
  return attention_bwd(DType(dt), a, nullptr);
}
// bwd: 0 = rotary_fwd, 1 = rotary_bwd. xs, os: (b, h, t) strides of x and out; cs: cos (b, t),
// sin (b, t) strides; sh: B, H, T, D, R.
int rotary_run(int bwd, int xdt, int cdt, int odt, const void* x, const int64_t* xs, const void* cos,
               const void* sin, const int64_t* cs, void* out, const int64_t* os, const int64_t* sh) {
  RotaryArgs a{};
  a.x = x; a.x_stride = {xs[0], xs[1], xs[2]};
  a.cos = cos; a.sin = sin;
  a.cos_stride_b = cs[0]; a.cos_stride_t = cs[1]; a.sin_stride_b = cs[2]; a.sin_stride_t = cs[3];
  a.out = out; a.out_stride = {os[0], os[1], os[2]};
  a.B = sh[0]; a.H = sh[1]; a.T = sh[2]; a.D = sh[3]; a.R = sh[4];
  return bwd ? rotary_bwd(DType(xdt), DType(cdt), DType(odt), a, nullptr)
             : rotary_fwd(DType(xdt), DType(cdt), DType(odt), a, nullptr);
}
}
