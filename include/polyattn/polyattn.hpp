/// \file polyattn.hpp
/// Umbrella header: includes every public polyattn header, in data-flow order.
#pragma once

#include "common.hpp"
