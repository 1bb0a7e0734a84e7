// Shared helpers for the C++ kernels: boundary checks with readable messages.
#pragma once
#include <c10/util/Exception.h>

#define KK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define KK_CHECK_CPU(x) KK_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define KK_CHECK_CONTIGUOUS(x) KK_CHECK((x).is_contiguous(), #x " must be contiguous")
#define KK_CHECK_DIM(x, n) KK_CHECK((x).dim() == (n), #x " must have ", n, " dims, got shape ", (x).sizes())
