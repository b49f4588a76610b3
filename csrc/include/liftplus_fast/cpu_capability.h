// Run-time CPU dispatch (docs/architecture.md, "CPU capabilities"), as ATen's DispatchStub: a
// kernel file that declares LPF_CPU_CAPABILITIES(...) is compiled once for the portable baseline
// and once for each capability it names, each build in its own namespace (LPF_CPU_NS); when the
// library loads, csrc/cpu_dispatch.cpp registers, per file, the widest build that this CPU runs
// and LIFTPLUS_FAST_CPU_CAPABILITY allows. Code of a capability build runs only once chosen:
// such a file has no static initialisers of its own (LPF_CPU_LIBRARY_IMPL defines a plain
// function, not a TORCH_LIBRARY_IMPL object).
#pragma once

// The namespace of the build being compiled (cpu_default, cpu_avx2, cpu_avx512,
// cpu_avx512_bf16, cpu_amx; set by CMakeLists.txt). Every header of csrc/include puts its inline
// functions in it, so copies compiled for different instruction sets never merge at link time.
#ifndef LPF_CPU_NS
#define LPF_CPU_NS cpu_default
#endif
// This build's capability as a number (Capability below); 0 in files compiled once.
#ifndef LPF_CPU_CAPABILITY
#define LPF_CPU_CAPABILITY 0
#endif

#define LPF_CPU_CAT_(a, b) a##b
#define LPF_CPU_CAT(a, b) LPF_CPU_CAT_(a, b)

// The capabilities a kernel file is compiled for besides the baseline, e.g.
// LPF_CPU_CAPABILITIES(avx2, avx512); CMakeLists.txt reads this line (one per file, at the start
// of a line, outside any namespace). An empty list compiles the baseline only.
#define LPF_CPU_CAPABILITIES(...) static_assert(true, "capability builds of this file: " #__VA_ARGS__)

// The registration block of a dispatched kernel file, in place of
// TORCH_LIBRARY_IMPL(liftplus_fast, key, m), inside namespace LPF_CPU_NS: defines
// liftplus_fast::LPF_CPU_NS::<file>_register_<key>(torch::Library& m), which the dispatcher calls
// for the chosen build. Keys: CPU, CompositeExplicitAutograd.
#define LPF_CPU_LIBRARY_IMPL(key, m) void LPF_CPU_CAT(LPF_CPU_CAT(LPF_CPU_KERNEL, _register_), key)(torch::Library & m)

namespace liftplus_fast {
namespace cpu {

// Ordered: each capability includes the ones before it.
enum class Capability : int {
  kDefault = 0,     // portable baseline (x86-64, or any other architecture)
  kAVX2 = 1,        // AVX2 + FMA + F16C
  kAVX512 = 2,      // AVX-512 F/BW/VL/DQ
  kAVX512BF16 = 3,  // + AVX512-BF16
  kAMX = 4,         // + AMX tiles (bf16, int8), with the OS's tile state granted to the process
};
constexpr int kNumCapabilities = 5;

// "default", "avx2", "avx512", "avx512_bf16", "amx": the names LIFTPLUS_FAST_CPU_CAPABILITY takes.
const char* capability_name(Capability c);

// The capability the kernels run at: the widest this CPU and OS support, lowered by
// LIFTPLUS_FAST_CPU_CAPABILITY. Decided once, when the library loads; kernels compiled once may
// branch on it (for example to call a oneDNN AMX routine).
Capability selected_capability();

// The widest capability this CPU and OS support, whatever LIFTPLUS_FAST_CPU_CAPABILITY says: for
// choices about what runs inside PyTorch's own libraries (oneDNN picks its ISA by itself).
Capability supported_capability();

}  // namespace cpu
}  // namespace liftplus_fast
