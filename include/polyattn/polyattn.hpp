/// \file polyattn.hpp
/// Umbrella header: includes every public polyattn header, in data-flow order.
#pragma once

#include "common.hpp"
#include "polynomial.hpp"
#include "feature_map.hpp"
#include "attention_options.hpp"
#include "exact_attention.hpp"
#include "polynomial_attention.hpp"
