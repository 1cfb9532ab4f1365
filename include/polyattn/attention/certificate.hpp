/// \file attention/certificate.hpp
/// What a call states about its own error: Certificate for a forward pass, GradientCertificate for a backward
/// pass. Its own header so that the exact methods, whose bounds are all zero, need none of the polynomial code.
#pragma once

#include "../common.hpp"

#include <limits>

namespace polyattn {

/// Error statement of one approximate call.
struct Certificate {
  /// Measured score radius \f$R = c\max_i\|q_i\|\max_j\|k_j\|\f$ over all pairs (maximum over heads).
  double radius = 0;
  /// Width w of the exact near field (PolynomialAttentionOptions::exact_window); 0 when off. Its pairs are
  /// weighted by exp itself and carry no approximation error; every bound below is about the other (far) pairs.
  Index exact_window = 0;
  /// Score radius over the far pairs, the only ones the polynomial evaluates: \f$c\max_{(i,j)\ \text{far}}
  /// \|q_i\|\|k_j\|\f$ (maximum over heads), at most `radius`, equal to it without a window, 0 when every pair is
  /// near. The interval (when PolynomialAttentionOptions::radius is 0), `valid`, `poly_error` and the bounds refer
  /// to it: the entrywise argument of output_bound needs \f$|p(s)e^{-s} - 1| \le \varepsilon\f$ only where p is used.
  double far_radius = 0;
  /// The polynomial's certified interval \f$[-\text{interval}, \text{interval}]\f$.
  double interval = 0;
  /// Degree actually used (may exceed the requested one under RangePolicy::raise_degree).
  int degree = 0;
  /// Feature width r.
  Index features = 0;
  /// \f$\varepsilon\f$: certified \f$\max |p(x)e^{-x}-1|\f$ over the interval.
  double poly_error = std::numeric_limits<double>::infinity();
  /// p certified positive on the interval (keeps every normaliser \f$\tilde D_{ii} > 0\f$).
  bool positive = false;
  /// \f$\frac{2\varepsilon}{1-\varepsilon}\max_j\|v_j\|_\infty\f$: bounds every entry of \f$\tilde O - O\f$
  /// unless vacuous(); \f$+\infty\f$ when \f$\varepsilon \ge 1\f$.
  double output_bound = std::numeric_limits<double>::infinity();
  /// False when \f$R\f$ (far_radius) exceeded the interval (RangePolicy::mark_invalid): no bound holds.
  bool valid = true;
  /// Number of sampled rows of the a-posteriori estimate (0: not run).
  Index sampled_rows = 0;
  /// Largest sampled \f$\|\tilde o_i - o_i\|_2 / \|o_i\|_2\f$ against exact attention: the whole error of the
  /// output, with or without an exact window.
  double sampled_max_error = std::numeric_limits<double>::quiet_NaN();
  /// Mean sampled \f$\|\tilde o_i - o_i\|_2 / \|o_i\|_2\f$.
  double sampled_mean_error = std::numeric_limits<double>::quiet_NaN();

  /// True when no a-priori bound holds (invalid interval or \f$\varepsilon \ge 1\f$).
  bool vacuous() const { return !valid || !(poly_error < 1); }
};

/// Error statement of one backward call. Exact methods leave every bound at zero.
struct GradientCertificate {
  /// The certificate of the forward pass whose gradient this is (R, \f$\varepsilon\f$, output bound).
  Certificate forward;
  /// A-priori bound on every entry of \f$\widetilde{dV} - dV\f$; \f$+\infty\f$ when vacuous.
  double dv_bound = 0;
  /// A-priori bound on every entry of \f$\widetilde{dQ} - dQ\f$ and \f$\widetilde{dK} - dK\f$; \f$+\infty\f$ when vacuous.
  double dqk_bound = 0;
  /// A-priori bound on every entry of \f$\widetilde{dQ} - dQ\f$ alone (\f$\le\f$ dqk_bound): sharper for the adjoint
  /// method, whose dQ bound lacks the column-sum factor of its dK bound; equal to dqk_bound where a method bounds
  /// dQ and dK only together (paper).
  double dq_bound = 0;
  /// A-priori bound on every entry of \f$\widetilde{dK} - dK\f$ alone (\f$\le\f$ dqk_bound); see dq_bound.
  double dk_bound = 0;
  /// \f$\varepsilon'\f$: certified \f$\max|p'(x)e^{-x} - 1|\f$ over the forward interval, for methods that
  /// differentiate p (adjoint); 0 for exact methods; NaN for the paper method, which does not differentiate p
  /// (not applicable, unlike 0, which would read as exact).
  double derivative_error = 0;
};

}  // namespace polyattn
