/* patterns.c - one exported, noinline function per call-site shape tagsplit must handle.
 *
 * Tags are written as the C literal (reversed) with the PoolMon display form in the comment. Function names
 * start with P_. See patterns.truth.json for the expected sites and README.md for the list.
 */
#include "compat.h"

PVOID g_Last;             /* results are stored here so that no call is a tail call unless meant to be */
ULONG g_Count;
ULONG g_Flags;
ULONG g_PoolTag = 'bGlP'; /* "PlGb": read from memory at the call (P_GlobalTag); written by P_SetGlobalTag */
NPAGED_LOOKASIDE_LIST g_NpLookaside;
PAGED_LOOKASIDE_LIST g_PagedLookaside;
LOOKASIDE_LIST_EX g_LookasideEx;
PVOID g_DriverBlock;

/* ---- one API per function: the plain shapes ---- */

TB_FUNC PVOID NTAPI P_WithTag(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x110, '1tWP'); /* "PWt1" */
    g_Last = p;
    g_Count++;
    return p;
}

TB_FUNC PVOID NTAPI P_Pool2(void)
{
    PVOID p = ExAllocatePool2(TB_POOL_FLAG_NON_PAGED, 0x120, '2lPP'); /* "PPl2" */
    g_Last = p;
    g_Count++;
    return p;
}

/* ExAllocatePool3 is declared without dllimport (compat.h): this call goes through the import thunk. */
TB_FUNC PVOID NTAPI P_Pool3(void)
{
    PVOID p = ExAllocatePool3(TB_POOL_FLAG_PAGED, 0x130, '3lPP', NULL, 0); /* "PPl3" */
    g_Last = p;
    g_Count++;
    return p;
}

TB_FUNC PVOID NTAPI P_QuotaTag(void)
{
    PVOID p = ExAllocatePoolWithQuotaTag(PagedPool, 0x140, 'atQP'); /* "PQta" */
    g_Last = p;
    g_Count++;
    return p;
}

TB_FUNC PVOID NTAPI P_TagPriority(void)
{
    PVOID p = ExAllocatePoolWithTagPriority(NonPagedPoolNx, 0x150, 'irPP', NormalPoolPriority); /* "PPri" */
    g_Last = p;
    g_Count++;
    return p;
}

/* The real untagged import (mingw-w64 declares ExAllocatePool as a function; in the WDK it is a macro for
 * ExAllocatePoolWithTag(..., ' mdW')). The kernel charges it to tag 'None'. */
TB_FUNC PVOID NTAPI P_Untagged(void)
{
    PVOID p = ExAllocatePool(NonPagedPool, 0x160);
    g_Last = p;
    g_Count++;
    return p;
}

TB_FUNC VOID NTAPI P_FreeWithTag(PVOID p)
{
    ExFreePoolWithTag(p, '1tWP'); /* "PWt1" */
    g_Count--;
}

/* ExFreePool2 is declared without dllimport (compat.h): this call goes through the import thunk. */
TB_FUNC VOID NTAPI P_FreePool2(PVOID p)
{
    ExFreePool2(p, '2lPP', NULL, 0); /* "PPl2" */
    g_Count--;
}

TB_FUNC VOID NTAPI P_FreeUntagged(PVOID p)
{
    ExFreePool(p);
    g_Count--;
}

TB_FUNC VOID NTAPI P_LookasideNP(void)
{
    ExInitializeNPagedLookasideList(&g_NpLookaside, NULL, NULL, 0, 0x170, 'pnLP', 0); /* "PLnp" */
    g_Count++;
}

TB_FUNC VOID NTAPI P_LookasidePaged(void)
{
    ExInitializePagedLookasideList(&g_PagedLookaside, NULL, NULL, 0, 0x180, 'gpLP', 0); /* "PLpg" */
    g_Count++;
}

TB_FUNC NTSTATUS NTAPI P_LookasideEx(void)
{
    NTSTATUS st = ExInitializeLookasideListEx(&g_LookasideEx, NULL, NULL, NonPagedPoolNx, 0, 0x1a0, 'xeLP', 0); /* "PLex" */
    g_Count++;
    return st;
}

/* ---- one tag shared by several sites in different functions (and by two different APIs) ---- */

TB_FUNC PVOID NTAPI P_SharedA(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x1b0, 'rhSP'); /* "PShr" */
    g_Last = p;
    return p;
}

TB_FUNC PVOID NTAPI P_SharedB(void)
{
    PVOID p = ExAllocatePoolWithTag(PagedPool, 0x1b8, 'rhSP'); /* "PShr" */
    g_Last = p;
    g_Count += 2;
    return p;
}

TB_FUNC PVOID NTAPI P_SharedC(void)
{
    PVOID p = ExAllocatePool2(TB_POOL_FLAG_NON_PAGED, 0x1c0, 'rhSP'); /* "PShr": the Win11 build of a Win10 site */
    g_Last = p;
    g_Count += 3;
    return p;
}

TB_FUNC VOID NTAPI P_SharedFree(PVOID p)
{
    ExFreePoolWithTag(p, 'rhSP'); /* "PShr" */
    g_Count -= 4;
}

/* ---- a tag staged once in a (callee-saved) register and reused by three calls ---- */

TB_FUNC PVOID NTAPI P_StagedReg(void)
{
    ULONG t = 'gtSP'; /* "PStg" */
    PVOID a, b;
    TB_OPAQUE(t); /* materialise 'gtSP' once, before the calls: every call below copies it from one register */
    a = ExAllocatePoolWithTag(NonPagedPoolNx, 0x1d0, t);
    b = ExAllocatePoolWithTag(PagedPool, 0x1d8, t);
    if (b != NULL) {
        ExFreePoolWithTag(b, t);
    }
    g_Last = a;
    return a;
}

/* ---- the tag is set before a branch; the calls come after it ----
 * gcc -O2 hoists the common `mov r8d, tag` above the branch and keeps both calls; clang sinks the two calls into
 * one in the join block (TB_TAG_IN_R8 keeps its `mov r8d, tag` above the branch). Either way a call site whose
 * tag was set in a predecessor block. */

TB_FUNC PVOID NTAPI P_BranchJoin(ULONG flags)
{
    PVOID p;
    TB_TAG_IN_R8(tag, 'nJrP'); /* "PrJn" */
    if (flags & 1) {
        p = ExAllocatePoolWithTag(PagedPool, 0x1e0, tag);
    } else {
        p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x1e8, tag);
    }
    g_Last = p;
    return p;
}

/* ---- two different constants reach one call: a default, overridden on one path ---- */

TB_FUNC PVOID NTAPI P_TwoConst(ULONG flags)
{
    ULONG tag = 'AowT'; /* "TwoA" */
    PVOID p;
    if (flags & 4) {
        tag = 'xBqZ'; /* "ZqBx" */
        g_Flags = flags;
    }
    p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x1f0, tag);
    g_Last = p;
    return p;
}

/* ---- the tag is loaded from a global variable ---- */

TB_FUNC PVOID NTAPI P_GlobalTag(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x200, g_PoolTag);
    g_Last = p;
    return p;
}

TB_FUNC VOID NTAPI P_SetGlobalTag(ULONG tag)
{
    g_PoolTag = tag;
}

/* ---- the tag is computed at run time ---- */

TB_FUNC PVOID NTAPI P_Computed(ULONG i)
{
    ULONG tag = '0gTP' + ((i & 7) << 24); /* "PTg0" .. "PTg7" */
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x210, tag);
    g_Last = p;
    return p;
}

/* ---- tail calls: the call is the function's last act (jmp [IAT] where the compiler does sibling calls) ---- */

TB_FUNC PVOID NTAPI P_TailAlloc(SIZE_T size)
{
    return ExAllocatePoolWithTag(NonPagedPoolNx, size, 'lTaP'); /* "PaTl" */
}

TB_FUNC VOID NTAPI P_TailFree(PVOID p)
{
    ExFreePoolWithTag(p, 'lTaP'); /* "PaTl" */
}

/* ---- two calls in one function: gcc loads the import pointer once (mov rbx,[IAT]; call rbx) ---- */

TB_FUNC PVOID NTAPI P_CachedImport(void)
{
    PVOID a = ExAllocatePoolWithTag(NonPagedPoolNx, 0x220, '1aCP'); /* "PCa1" */
    PVOID b = ExAllocatePoolWithTag(PagedPool, 0x228, '2aCP');      /* "PCa2" */
    g_Last = b;
    return a;
}

/* ---- small wrappers: a fixed tag, and the tag as a parameter ---- */

TB_FUNC PVOID NTAPI MyAlloc(SIZE_T size)
{
    return ExAllocatePoolWithTag(NonPagedPoolNx, size, 'lAyM'); /* "MyAl" */
}

TB_FUNC PVOID NTAPI MyAllocWithTag(SIZE_T size, ULONG tag)
{
    return ExAllocatePoolWithTag(NonPagedPoolNx, size, tag);
}

TB_FUNC PVOID NTAPI P_UseMyAlloc1(void) { PVOID p = MyAlloc(0x240); g_Last = p; return p; }
TB_FUNC PVOID NTAPI P_UseMyAlloc2(void) { PVOID p = MyAlloc(0x248); g_Count++; return p; }
TB_FUNC PVOID NTAPI P_UseMyAlloc3(void) { PVOID p = MyAlloc(0x250); g_Count += 2; return p; }
TB_FUNC PVOID NTAPI P_UseMyTag1(void) { PVOID p = MyAllocWithTag(0x258, '1tMP'); g_Last = p; return p; }    /* "PMt1" */
TB_FUNC PVOID NTAPI P_UseMyTag2(void) { PVOID p = MyAllocWithTag(0x260, '2tMP'); g_Count++; return p; }    /* "PMt2" */
TB_FUNC PVOID NTAPI P_UseMyTag3(void) { PVOID p = MyAllocWithTag(0x268, '3tMP'); g_Count += 2; return p; } /* "PMt3" */

/* ---- non-ASCII and PROTECTED_POOL tags ---- */

TB_FUNC PVOID NTAPI P_NonAscii(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x270, 0x00000CAD); /* bytes AD 0C 00 00: not printable */
    g_Last = p;
    return p;
}

TB_FUNC PVOID NTAPI P_ProtAlloc(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x278, 'torP' | TB_PROTECTED_POOL); /* "Prot", 0xF46F7250 */
    g_Last = p;
    return p;
}

TB_FUNC VOID NTAPI P_ProtFree(PVOID p)
{
    ExFreePoolWithTag(p, 'torP' | TB_PROTECTED_POOL); /* must match the allocation, bit 31 included */
    g_Count--;
}

/* ---- pageable and discardable code ---- */

TB_PAGE TB_FUNC PVOID NTAPI P_PagedCode(void)
{
    PVOID p = ExAllocatePoolWithTag(PagedPool, 0x280, 'gaPP'); /* "PPag" */
    g_Last = p;
    return p;
}

TB_INIT TB_FUNC PVOID NTAPI P_InitCode(void)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, 0x288, 'tnIP'); /* "PInt" */
    g_Last = p;
    return p;
}

TB_FUNC VOID NTAPI DriverUnload(PDRIVER_OBJECT DriverObject)
{
    (void)DriverObject;
    if (g_DriverBlock != NULL) {
        ExFreePoolWithTag(g_DriverBlock, 'vrDP'); /* "PDrv" */
    }
}

TB_INIT TB_FUNC NTSTATUS NTAPI DriverEntry(PDRIVER_OBJECT DriverObject, PUNICODE_STRING RegistryPath)
{
    (void)RegistryPath;
    g_DriverBlock = ExAllocatePoolWithTag(NonPagedPoolNx, 0x290, 'vrDP'); /* "PDrv" */
    if (g_DriverBlock == NULL) {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    P_InitCode();
    DriverObject->DriverUnload = DriverUnload;
    return STATUS_SUCCESS;
}
