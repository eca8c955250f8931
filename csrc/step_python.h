// The Python functions of legw_fused._C (csrc/step_python.cpp): the optimizer step's per-tensor host work in C++.
#pragma once

#include <Python.h>

namespace legw_fused {

// A null-terminated PyMethodDef table: group_params, fused_step_unboxed.
PyMethodDef* python_methods();

}  // namespace legw_fused
