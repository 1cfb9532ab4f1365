/// \file attention/block_product.hpp
/// \f$C = AB\f$ (or \f$C \mathrel{+}= AB\f$) for a column-major block of rows \f$A\f$ and a small right factor
/// \f$B\f$: the products of the polynomial kernel (polynomial_kernel.hpp) between a chunk's monomials, values or
/// adjoints and a state, and between a causal chunk's masked score block and its keys, queries or values.
///
/// Those products are skinny: \f$M Z\f$ (rows x r times r x (d_v+1), 17 columns at d_v = 16) and
/// \f$E Z^\top\f$ (rows x (d_v+1) times (d_v+1) x r). Eigen's GEMM packs both factors into panels and zeroes
/// the destination first; with 17 columns each packed entry of \f$A\f$ then serves only 17 multiply-adds, and
/// a causal chunk of 64 rows repacks its state for every chunk. Here each tile of \f$C\f$, a few SIMD packets
/// of rows times a few columns, is accumulated in registers straight from \f$A\f$'s columns and written once:
/// per step of the inner dimension it loads the tile's rows of one column of \f$A\f$ and broadcasts one entry
/// of \f$B\f$ per column. Measured at 64 x 153 times 153 x 17 in float (AVX-512): 100-110 GFLOP/s against
/// Eigen's 70. A causal chunk's 64 x 64 score block (zero above the diagonal) times its 64 x 16 keys, in float:
/// 1.3 us as a dense product here, 0.86-0.95 us on the block's causal panels only (causal_product_add(): 10 of
/// its 16 tiles of 16 x 16), against 2.0 us for Eigen's triangular product (2.5 us with the block transposed;
/// transpose_into() makes that transpose in 0.4 us, 0.25 us on the panels, Eigen's assignment in 2.7).
///
/// Every entry is the multiply-add chain \f$c_{ij} = (\dots(a_{i1}b_{1j}) + \dots) + a_{ik}b_{kj}\f$ in order
/// of \f$k\f$, starting from \f$c_{ij}\f$ itself in block_product_add(). The rows after the last full packet
/// are done one at a time, with scalar multiply-adds that may round where the packets' fused ones do not; so a
/// row's bits depend on the block's row count, which the kernel's partitions fix independently of the thread
/// count, and on nothing else.
///
/// Usage (`A` column-major with unit inner stride; `B` any Eigen expression with direct access, e.g. a
/// transposed block):
/// \code
///   polyattn::detail::block_product<float>(monomials, state, products);               // C = M Z
///   polyattn::detail::block_product<float>(adjoints, state.transpose(), gradients);   // C = E Z^T
///   polyattn::detail::block_product_add<float>(weights, values, products);            // C += A [V, 1]
///   polyattn::detail::causal_product_add<float>(masked_scores, keys, query_grads);    // C += tril(S) K
///   polyattn::detail::transposed_product_add<float>(keys, values, state, scratch);  // C += K^T V
/// \endcode
#pragma once

#include "../common.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define POLYATTN_UNROLL _Pragma("GCC unroll 8")
#else
#define POLYATTN_UNROLL
#endif

namespace polyattn {
namespace detail {

/// Register tile of block_product() for Packet: `row_packets` packets of rows times `columns` columns, as many
/// accumulators as the target's SIMD registers allow beside the loads and the broadcast. The 1 to 3 packets of
/// rows left after the last full tile (a causal chunk's panels of 48, 32 and 16 rows, and the 16 value or adjoint
/// columns of a chunk's state, transposed) take one tile of remainder_columns() columns rather than single packets
/// that each read the same entries of B again (causal adjoint at 2^18 in float, AVX-512, one thread: 2-2.5%
/// faster; 24 accumulators gained less). A single packet takes 8 columns where there are 32 registers: 8
/// independent multiply-add chains cover the FMA latency (4 cycles at 2 per cycle), which 6 did not (the
/// polynomial forward at 2^18: causal 28.2 -> 27.6 ms, non-causal 20.9-21.6 -> 20.5-20.9 ms); 10 or 12 columns
/// are more than POLYATTN_UNROLL unrolls, and their accumulators spill (34-35 ms).
template <class T>
struct BlockProductTile {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr int lanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
  static constexpr int row_packets = registers >= 32 ? 4 : registers >= 16 ? 2 : 1;
  static constexpr int columns = registers >= 32 ? 6 : registers >= 16 ? 5 : 3;
  /// Columns of the tile of the `packets` (1 to row_packets - 1) packets of rows after the last full tile.
  static constexpr int remainder_columns(int packets) {
    return packets == 1 ? (registers >= 32 ? 8 : columns) : 16 / packets;
  }
};

/// One tile: C(0 : RowPackets lanes, 0 : Columns) = (C +, with Accumulate) A(rows, 0 : depth) B(0 : depth,
/// 0 : Columns), where B's entry (k, j) is at b[k * b_row_stride + j * b_col_stride]. Packet may be the scalar T
/// itself (one lane).
template <bool Accumulate, class Packet, int RowPackets, int Columns, class T>
EIGEN_STRONG_INLINE void block_product_tile(const T* a, Index lda, Index depth, const T* b, Index b_row_stride,
                                            Index b_col_stride, T* c, Index ldc) {
  using namespace Eigen::internal;
  constexpr int lanes = unpacket_traits<Packet>::size;
  // The loops over the tile are unrolled (they have constant bounds) so that acc stays in registers; -O2
  // does not unroll them by itself.
  Packet acc[RowPackets][Columns];
  POLYATTN_UNROLL
  for (int p = 0; p < RowPackets; ++p)
    POLYATTN_UNROLL
    for (int j = 0; j < Columns; ++j)
      acc[p][j] = Accumulate ? ploadu<Packet>(c + j * ldc + p * lanes) : pset1<Packet>(T(0));
  for (Index k = 0; k < depth; ++k) {
    Packet rows[RowPackets];
    POLYATTN_UNROLL
    for (int p = 0; p < RowPackets; ++p) rows[p] = ploadu<Packet>(a + k * lda + p * lanes);
    POLYATTN_UNROLL
    for (int j = 0; j < Columns; ++j) {
      const Packet entry = pset1<Packet>(b[k * b_row_stride + j * b_col_stride]);
      POLYATTN_UNROLL
      for (int p = 0; p < RowPackets; ++p) acc[p][j] = pmadd(rows[p], entry, acc[p][j]);
    }
  }
  POLYATTN_UNROLL
  for (int j = 0; j < Columns; ++j)
    POLYATTN_UNROLL
    for (int p = 0; p < RowPackets; ++p) pstoreu(c + j * ldc + p * lanes, acc[p][j]);
}

/// The last `count` (< Columns) columns of a row tile: the tile of exactly `count` columns.
template <bool Accumulate, class Packet, int RowPackets, int Columns, class T>
EIGEN_STRONG_INLINE void block_product_last_columns(Index count, const T* a, Index lda, Index depth, const T* b,
                                                    Index b_row_stride, Index b_col_stride, T* c, Index ldc) {
  if constexpr (Columns > 1) {
    if (count == Columns - 1)
      block_product_tile<Accumulate, Packet, RowPackets, Columns - 1>(a, lda, depth, b, b_row_stride, b_col_stride,
                                                                      c, ldc);
    else
      block_product_last_columns<Accumulate, Packet, RowPackets, Columns - 1>(count, a, lda, depth, b,
                                                                              b_row_stride, b_col_stride, c, ldc);
  }
}

/// The tiles of `row_count` rows (a multiple of RowPackets lanes) starting at row `row0`, over all columns: full
/// groups of the tile's columns, then the remaining 1 to Columns - 1 columns.
template <bool Accumulate, class Packet, int RowPackets, int Columns, class T>
void block_product_rows(Index row0, Index row_count, const T* a, Index lda, Index depth, const T* b,
                        Index b_row_stride, Index b_col_stride, Index cols, T* c, Index ldc) {
  constexpr Index step = RowPackets * Eigen::internal::unpacket_traits<Packet>::size;
  for (Index i = row0; i < row0 + row_count; i += step) {
    Index j = 0;
    for (; j + Columns <= cols; j += Columns)
      block_product_tile<Accumulate, Packet, RowPackets, Columns>(a + i, lda, depth, b + j * b_col_stride,
                                                                  b_row_stride, b_col_stride, c + j * ldc + i, ldc);
    if (j < cols)
      block_product_last_columns<Accumulate, Packet, RowPackets, Columns>(cols - j, a + i, lda, depth,
                                                                          b + j * b_col_stride, b_row_stride,
                                                                          b_col_stride, c + j * ldc + i, ldc);
  }
}

/// The rows [row0, row0 + packets lanes), 0 < packets < RowPackets: one row of tiles of `packets` packets.
template <bool Accumulate, class Packet, int RowPackets, class T>
void block_product_remaining_packets(Index packets, Index row0, const T* a, Index lda, Index depth, const T* b,
                                     Index b_row_stride, Index b_col_stride, Index cols, T* c, Index ldc) {
  if constexpr (RowPackets > 1) {
    constexpr int tile = RowPackets - 1;
    if (packets == tile)
      block_product_rows<Accumulate, Packet, tile, BlockProductTile<T>::remainder_columns(tile)>(
          row0, tile * Eigen::internal::unpacket_traits<Packet>::size, a, lda, depth, b, b_row_stride, b_col_stride,
          cols, c, ldc);
    else
      block_product_remaining_packets<Accumulate, Packet, tile>(packets, row0, a, lda, depth, b, b_row_stride,
                                                                b_col_stride, cols, c, ldc);
  }
}

/// C = A B, or C += A B with Accumulate, for A (rows x depth) column-major with unit inner stride, B (depth x
/// cols) any expression with direct access, and C (rows x cols) column-major; none may alias C. Rows are done in
/// tiles of BlockProductTile<T> packets, then one tile of the packets left, then one row at a time.
template <bool Accumulate, class T, class DerivedB>
void block_product_into(const ConstMatrixRef<T>& A, const Eigen::MatrixBase<DerivedB>& B, MatrixRef<T> C) {
  static_assert(bool(DerivedB::Flags & Eigen::DirectAccessBit),
                "block_product: B must have direct access (a Matrix, Map, Ref, Block or its transpose)");
  using Tile = BlockProductTile<T>;
  using Packet = typename Tile::Packet;
  const Index rows = A.rows(), depth = A.cols(), cols = B.cols();
  eigen_assert(B.rows() == depth && C.rows() == rows && C.cols() == cols);
  const T* a = A.data();
  const T* b = B.derived().data();
  const Index lda = A.outerStride(), ldc = C.outerStride();
  const Index b_row_stride = B.derived().rowStride(), b_col_stride = B.derived().colStride();
  constexpr Index tile_rows = Tile::row_packets * Tile::lanes;
  const Index tiled = rows / tile_rows * tile_rows;
  const Index packed = tiled + (rows - tiled) / Tile::lanes * Tile::lanes;
  block_product_rows<Accumulate, Packet, Tile::row_packets, Tile::columns>(0, tiled, a, lda, depth, b, b_row_stride,
                                                                           b_col_stride, cols, C.data(), ldc);
  if constexpr (Tile::lanes > 1)
    block_product_remaining_packets<Accumulate, Packet, Tile::row_packets>((packed - tiled) / Tile::lanes, tiled, a,
                                                                           lda, depth, b, b_row_stride, b_col_stride,
                                                                           cols, C.data(), ldc);
  block_product_rows<Accumulate, T, 1, Tile::columns>(packed, rows - packed, a, lda, depth, b, b_row_stride,
                                                      b_col_stride, cols, C.data(), ldc);
}

/// C = A B (written): see block_product_into().
template <class T, class DerivedB>
void block_product(const ConstMatrixRef<T>& A, const Eigen::MatrixBase<DerivedB>& B, MatrixRef<T> C) {
  block_product_into<false, T>(A, B, C);
}

/// C += A B: see block_product_into().
template <class T, class DerivedB>
void block_product_add(const ConstMatrixRef<T>& A, const Eigen::MatrixBase<DerivedB>& B, MatrixRef<T> C) {
  block_product_into<true, T>(A, B, C);
}

// GCC warns that PacketBlock<Packet, n> drops the attributes of the SIMD type it is given (its alignment), as Eigen's
// own headers, which use PacketBlock the same way, silence: a PacketBlock is an array of packets whose alignment
// comes from the packet type itself.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
/// At = A^T for column-major A and At, which must not overlap: square tiles of one SIMD packet per column are
/// transposed in registers, the rows and columns past the last full tile one entry at a time. It turns a
/// transposed left factor of block_product() into a column-major one.
template <class T>
void transpose_into(const ConstMatrixRef<T>& A, MatrixRef<T> At) {
  using Packet = typename BlockProductTile<T>::Packet;
  constexpr int lanes = BlockProductTile<T>::lanes;
  const Index rows = A.rows(), cols = A.cols();
  eigen_assert(At.rows() == cols && At.cols() == rows);
  const Index tiled_rows = rows / lanes * lanes, tiled_cols = cols / lanes * lanes;
  for (Index j = 0; j < tiled_cols; j += lanes)
    for (Index i = 0; i < tiled_rows; i += lanes) {
      // Packet k holds rows i.. of column j + k; after the transpose, columns j.. of row i + k.
      Eigen::internal::PacketBlock<Packet, lanes> tile;
      for (int k = 0; k < lanes; ++k)
        tile.packet[k] = Eigen::internal::ploadu<Packet>(A.data() + (j + k) * A.outerStride() + i);
      Eigen::internal::ptranspose(tile);
      for (int k = 0; k < lanes; ++k)
        Eigen::internal::pstoreu(At.data() + (i + k) * At.outerStride() + j, tile.packet[k]);
    }
  for (Index j = 0; j < cols; ++j)
    for (Index i = j < tiled_cols ? tiled_rows : 0; i < rows; ++i) At(j, i) = A(i, j);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/// The panels of a causal block, a square block of scores or of their gradients (queries x keys) that is zero
/// above its diagonal: `f(j0, width)` for each panel of `width` = one SIMD packet of columns from `j0` (the
/// last may be narrower). A panel's rows from j0 on hold every non-zero of its columns; the products below
/// read and write those only, about (n + lanes) / 2n of the block. Since every j0 is a whole number of
/// packets, a row is in the packet part of every panel that holds it or in none, so its bits depend on the
/// block's row count only, as for block_product().
template <class T, class F>
void for_causal_panels(Index rows, const F& f) {
  constexpr Index lanes = BlockProductTile<T>::lanes;
  for (Index j0 = 0; j0 < rows; j0 += lanes) f(j0, std::min(lanes, rows - j0));
}

/// Calls body(j, i, packet, on_or_below) for the entries of the causal panels of a rows x rows block, column j by
/// column: its rows from j's panel start on, in SIMD packets from row i (then one row at a time with the scalar T
/// as the packet). For a packet that reaches above the diagonal, `on_or_below` points at the mask of its lanes
/// with row >= j, for Eigen's pselect(); it is null for the others. The loops that make a block zero above its
/// diagonal as they write it use it, instead of a pass of their own (Eigen's triangular assignment is not
/// vectorised).
///
/// The body is copied into a local and should capture what it reads by value (pointers, strides, scalars): a SIMD
/// store may alias anything, so after each one the compiler reloads whatever a capture by reference points at,
/// which made the causal forward's polynomial pass several times slower than its arithmetic.
template <class T, class Body>
void for_causal_packets(Index rows, const Body& body) {
  using namespace Eigen::internal;
  using Packet = typename BlockProductTile<T>::Packet;
  constexpr Index lanes = BlockProductTile<T>::lanes;
  const Body local_body = body;
  for (Index j0 = 0; j0 < rows; j0 += lanes) {
    const Index packets_end = j0 + (rows - j0) / lanes * lanes;
    for (Index j = j0; j < std::min(j0 + lanes, rows); ++j) {
      Index i = j0;
      if (i < packets_end) {
        const Packet row_minus_column = plset<Packet>(static_cast<T>(i - j));
        const Packet on_or_below = pcmp_le(pzero(row_minus_column), row_minus_column);
        if (i == j)
          local_body(j, i, Packet(), static_cast<const Packet*>(nullptr));
        else
          local_body(j, i, Packet(), &on_or_below);
        i += lanes;
      }
      for (; i < packets_end; i += lanes) local_body(j, i, Packet(), static_cast<const Packet*>(nullptr));
      for (; i < rows; ++i) {
        const T on_or_below = pcmp_le(T(0), static_cast<T>(i - j));
        if (i >= j)
          local_body(j, i, T(), static_cast<const T*>(nullptr));
        else
          local_body(j, i, T(), &on_or_below);
      }
    }
  }
}

/// `x`, or zero in the lanes off `mask` when there is one: the store of a for_causal_packets() body.
template <class Packet>
Packet masked(const Packet& x, const Packet* mask) {
  return mask ? Eigen::internal::pselect(*mask, x, Eigen::internal::pzero(x)) : x;
}

/// C = A B on the causal panels of C (rows x rows): panel j0 gets its rows from j0 on; the rest of C is not
/// written. For the score block of a chunk, Q K^T.
template <class T, class DerivedB>
void causal_block_product(const ConstMatrixRef<T>& A, const Eigen::MatrixBase<DerivedB>& B, MatrixRef<T> C) {
  const Index rows = C.rows();
  eigen_assert(C.cols() == rows);
  for_causal_panels<T>(rows, [&](Index j0, Index width) {
    block_product<T>(A.bottomRows(rows - j0), B.middleCols(j0, width), C.block(j0, j0, rows - j0, width));
  });
}

/// C += L B for a causal block L (rows x rows; only its panels are read): depth panel j0 adds to the rows from j0
/// on. Every entry is the chain of block_product_add() without the terms above the diagonal panels.
template <class T, class DerivedB>
void causal_product_add(const ConstMatrixRef<T>& L, const Eigen::MatrixBase<DerivedB>& B, MatrixRef<T> C) {
  const Index rows = L.rows();
  eigen_assert(L.cols() == rows && C.rows() == rows);
  for_causal_panels<T>(rows, [&](Index j0, Index width) {
    block_product_add<T>(L.block(j0, j0, rows - j0, width), B.middleRows(j0, width), C.bottomRows(rows - j0));
  });
}

/// C += L^T B for a causal block L, given its transpose U = L^T from transpose_causal(): depth panel j0 adds to
/// the rows before j0 + width.
template <class T, class DerivedB>
void transposed_causal_product_add(const ConstMatrixRef<T>& U, const Eigen::MatrixBase<DerivedB>& B,
                                   MatrixRef<T> C) {
  const Index rows = U.rows();
  eigen_assert(U.cols() == rows && C.rows() == rows);
  for_causal_panels<T>(rows, [&](Index j0, Index width) {
    block_product_add<T>(U.block(0, j0, j0 + width, width), B.middleRows(j0, width), C.topRows(j0 + width));
  });
}

/// U = L^T on the transposed causal panels of L (rows x rows): the operand of transposed_causal_product_add().
template <class T>
void transpose_causal(const ConstMatrixRef<T>& L, MatrixRef<T> U) {
  const Index rows = L.rows();
  for_causal_panels<T>(rows, [&](Index j0, Index width) {
    transpose_into<T>(L.block(j0, j0, rows - j0, width), U.block(j0, j0, width, rows - j0));
  });
}

/// C = B^T A (or C += B^T A with Accumulate) for B (rows x c) and A (rows x m), both column-major with unit inner
/// stride, and C (c x m) column-major: a chunk's state, kept transposed, [V, 1]^T M or E^T M, or a state of the
/// paper method. Eigen computes it as a GEMM that packs both factors; here the first
/// c - c mod lanes rows of C are one block_product() with a transposed B of a few KiB as its left factor (a whole
/// number of SIMD packets of rows), and the rest, e.g. a state's normaliser rows, are matrix-vector products.
/// `transposed` is the caller's scratch, grown when too small (so that a chunk loop allocates once). Measured at
/// 64 x 17 and 64 x 153 floats (AVX-512): 3.8 us against Eigen's 6.1-6.8 with the state stored r x c (whose
/// transpose this layout saves).
template <bool Accumulate, class T>
void transposed_product_into(const ConstMatrixRef<T>& B, const ConstMatrixRef<T>& A, MatrixRef<T> C,
                             Matrix<T>& transposed) {
  const Index rows = A.rows(), cols = B.cols();
  const Index packed = cols / BlockProductTile<T>::lanes * BlockProductTile<T>::lanes;
  eigen_assert(B.rows() == rows && C.rows() == cols && C.cols() == A.cols());
  if (packed > 0) {
    if (transposed.rows() < packed || transposed.cols() < rows)
      transposed.resize(std::max(transposed.rows(), packed), std::max(transposed.cols(), rows));
    auto Bt = transposed.topLeftCorner(packed, rows);
    transpose_into<T>(B.leftCols(packed), Bt);
    block_product_into<Accumulate, T>(Bt, A, C.topRows(packed));
  }
  for (Index j = packed; j < cols; ++j) {
    if constexpr (Accumulate)
      C.row(j).noalias() += B.col(j).transpose() * A;
    else
      C.row(j).noalias() = B.col(j).transpose() * A;
  }
}

/// C = B^T A: see transposed_product_into().
template <class T>
void transposed_product(const ConstMatrixRef<T>& B, const ConstMatrixRef<T>& A, MatrixRef<T> C,
                        Matrix<T>& transposed) {
  transposed_product_into<false, T>(B, A, C, transposed);
}

/// C += B^T A: see transposed_product_into().
template <class T>
void transposed_product_add(const ConstMatrixRef<T>& B, const ConstMatrixRef<T>& A, MatrixRef<T> C,
                            Matrix<T>& transposed) {
  transposed_product_into<true, T>(B, A, C, transposed);
}

}  // namespace detail
}  // namespace polyattn

#undef POLYATTN_UNROLL
