// Vector code for the CPU kernels without -march flags: a function marked FASTENC_CPU_CLONES is compiled for
// AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and baseline x86-64, and the loader picks the best the CPU runs
// (gcc's target_clones; elsewhere it is one plain function). Helpers it calls must be FASTENC_INLINE, so that
// each clone gets its own copy compiled for its target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTENC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTENC_CPU_CLONES
#endif
#define FASTENC_INLINE inline __attribute__((always_inline))
