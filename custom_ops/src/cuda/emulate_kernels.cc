// Test builds only (CMake -DLREXPORT_CUDA_EMULATE=ON): the CUDA kernels compiled by the C++
// compiler, run on the CPU by emulate.h. See tests/test_custom_op_cuda_emulated.py.
#include "lowrank_kv_attention.cu"
