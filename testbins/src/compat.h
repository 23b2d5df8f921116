/* compat.h - one include for every testbins build.
 *
 * gcc (mingw-w64) and clang --target=*-w64-windows-gnu use mingw-w64's DDK <ntddk.h>; clang in MSVC mode
 * (--target=*-pc-windows-msvc, which defines _MSC_VER but not __MINGW32__) uses our own mini_wdm.h.
 * Neither knows ExAllocatePool2/ExAllocatePool3/ExFreePool2 (Windows 10 2004+): declared here.
 */
#ifndef TB_COMPAT_H
#define TB_COMPAT_H

#if defined(_MSC_VER) && !defined(__MINGW32__)
#include "mini_wdm.h"
#else
#include <ntddk.h>
#endif

/* ---- Windows 10 2004+ pool API (wdm.h of WDK 10.0.19041+) ---- */
typedef ULONG64 TB_POOL_FLAGS;                 /* POOL_FLAGS */
#define TB_POOL_FLAG_UNINITIALIZED 0x0000000000000002ULL
#define TB_POOL_FLAG_NON_PAGED     0x0000000000000040ULL
#define TB_POOL_FLAG_PAGED         0x0000000000000100ULL
struct _POOL_EXTENDED_PARAMETER;               /* opaque: only ever passed as NULL here */

NTKERNELAPI PVOID NTAPI ExAllocatePool2(TB_POOL_FLAGS Flags, SIZE_T NumberOfBytes, ULONG Tag);
/* Deliberately declared WITHOUT NTKERNELAPI (no __declspec(dllimport)), as a hand-written prototype often is:
 * calls then go `call rel32` to the import library's thunk (`jmp [IAT]`) instead of `call [IAT]`. */
PVOID NTAPI ExAllocatePool3(TB_POOL_FLAGS Flags, SIZE_T NumberOfBytes, ULONG Tag,
                            const struct _POOL_EXTENDED_PARAMETER *ExtendedParameters, ULONG ExtendedParametersCount);
VOID NTAPI ExFreePool2(PVOID P, ULONG Tag, const struct _POOL_EXTENDED_PARAMETER *ExtendedParameters,
                       ULONG ExtendedParametersCount);

#define TB_PROTECTED_POOL 0x80000000UL

/* ---- function attributes ---- */
#ifdef TB_EXPORT_VIA_DEF
#define TB_EXPORT /* exported by src/<source>.def (clang_x86 build) */
#else
#define TB_EXPORT __declspec(dllexport)
#endif
#if defined(__clang__)
#define TB_NOINLINE __attribute__((noinline))
#else
/* gcc: noipa = noinline + noclone + no identical-code-folding + no IPA-RA, so every exported function keeps
 * exactly the call sites its source shows (no .constprop/.isra clones, no merged look-alike bodies). */
#define TB_NOINLINE __attribute__((noipa))
#endif
#define TB_FUNC TB_EXPORT TB_NOINLINE              /* every function the ground truth names */
#define TB_PAGE __attribute__((section("PAGE")))   /* what #pragma alloc_text(PAGE, f) does under MSVC */
#define TB_INIT __attribute__((section("INIT")))   /* what #pragma alloc_text(INIT, f) does under MSVC */

/* Pin a value in a register without emitting any instruction: the compiler must materialise the constant
 * once, before this point, and can no longer rematerialise it at each use (it no longer "knows" the value). */
#define TB_OPAQUE(v) __asm__ volatile("" : "+r"(v))

/* Declare `ULONG name = value` for use as the 3rd argument of an x64 call (R8D). Under clang x64 the variable is
 * also pinned to r8 before any branch that follows: clang otherwise always re-materialises the constant right
 * before the call, whereas MSVC and gcc -O2 (code hoisting) often set R8D in a predecessor block. */
#if defined(__clang__) && defined(_WIN64)
#define TB_TAG_IN_R8(name, value) register ULONG name __asm__("r8") = (value); TB_OPAQUE(name)
#else
#define TB_TAG_IN_R8(name, value) ULONG name = (value)
#endif

#endif /* TB_COMPAT_H */
