/// \file exact_gradients.hpp
/// Exact gradients of softmax attention.
///
/// With \f$S = c\,QK^\top\f$ (\f$-\infty\f$ above the diagonal when causal), \f$P = \mathrm{softmax}_{\text{rows}}(S)\f$,
/// \f$O = PV\f$ and \f$G = \partial L/\partial O\f$:
/// \f[ \kappa = \mathrm{rowsum}(O\circ G),\quad p = P\circ(GV^\top) - \mathrm{diag}(\kappa)P = \partial L/\partial S,\f]
/// \f[ \partial L/\partial Q = c\,pK,\qquad \partial L/\partial K = c\,p^\top Q,\qquad \partial L/\partial V = P^\top G. \f]
/// (\f$\kappa_i = \sum_j P_{ij}(GV^\top)_{ij}\f$ because \f$O = PV\f$; the paper calls it \f$K\f$.)
#pragma once

#include "attention_backend.hpp"

namespace polyattn {

/// Materialised exact attention backward (the reference): forms each head's \f$n\times m\f$ matrices.
/// Writes dQ (n x h d_k), dK (m x h d_k), dV (m x h d_v) for G = dL/dO (n x h d_v).
///
/// \code
///   polyattn::Matrix<double> dQ(n, dk), dK(n, dk), dV(n, dv);
///   polyattn::attention_backward_reference(Q, K, V, G, {std::nullopt, true, 1}, dQ, dK, dV);
/// \endcode
template <class T>
void attention_backward_reference(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                                  const ConstMatrixRef<T>& G, const AttentionOptions& opt, MatrixRef<T> dQ,
                                  MatrixRef<T> dK, MatrixRef<T> dV) {
  detail::static_check_scalar<T>();
  constexpr const char* where = "polyattn::attention_backward_reference";
  const auto shape = detail::check_qkv(where, Q, K, V, opt);
  detail::require_shape(where, "G", G, shape.n, shape.heads * shape.dv);
  detail::require_finite(where, "G", G);
  detail::require_shape(where, "dQ", dQ, shape.n, shape.heads * shape.dk);
  detail::require_shape(where, "dK", dK, shape.m, shape.heads * shape.dk);
  detail::require_shape(where, "dV", dV, shape.m, shape.heads * shape.dv);
  const T c = static_cast<T>(opt.resolved_scale(shape.dk));
  for (Index h = 0; h < shape.heads; ++h) {
    const auto Qh = Q.middleCols(h * shape.dk, shape.dk);
    const auto Kh = K.middleCols(h * shape.dk, shape.dk);
    const auto Vh = V.middleCols(h * shape.dv, shape.dv);
    const auto Gh = G.middleCols(h * shape.dv, shape.dv);
    Matrix<T> P = c * Qh * Kh.transpose();
    if (opt.causal) P.template triangularView<Eigen::StrictlyUpper>().setConstant(-std::numeric_limits<T>::infinity());
    const Vector<T> row_max = P.rowwise().maxCoeff();
    P = (P.colwise() - row_max).array().exp();
    const Vector<T> inverse_row_sum = P.rowwise().sum().cwiseInverse();
    P = inverse_row_sum.asDiagonal() * P;
    const Matrix<T> O = P * Vh;
    const Vector<T> kappa = O.cwiseProduct(Gh).rowwise().sum();
    Matrix<T> p = P.cwiseProduct(Gh * Vh.transpose());
    p -= kappa.asDiagonal() * P;
    dQ.middleCols(h * shape.dk, shape.dk).noalias() = c * p * Kh;
    dK.middleCols(h * shape.dk, shape.dk).noalias() = c * p.transpose() * Qh;
    dV.middleCols(h * shape.dv, shape.dv).noalias() = P.transpose() * Gh;
  }
}

}  // namespace polyattn
