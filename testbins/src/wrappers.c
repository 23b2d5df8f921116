/* wrappers.c - allocation wrappers, for tagsplit's wrapper-aware mode.
 *
 * The pool APIs are called only from small wrappers; the tag is either fixed inside the wrapper (W_AllocFixed)
 * or a wrapper parameter (W_AllocTag, W_Inner via W_Outer, W_AllocTag again through a function pointer), so the
 * tag immediates sit at the wrappers' callers. Function names start with W_.
 *
 * Workloads (plain integer argument; only exported functions of this file and pool APIs are called):
 *   WrapWorkBalanced(n): n iterations, every block allocated is freed                     -> returns n
 *   WrapWorkLeaky(n):    same, except that the block W_CallerB allocated (W_AllocFixed, 'WFix', 0x40 bytes) is
 *                        not freed when i % 3 == 2 -> leaks n / 3 blocks, from caller W_CallerB.
 */
#include "compat.h"

#define W_FIXED_TAG 'xiFW' /* "WFix" */

typedef PVOID (NTAPI *W_ALLOC_ROUTINE)(SIZE_T Size, ULONG Tag);
typedef VOID (NTAPI *W_FREE_ROUTINE)(PVOID P, ULONG Tag);

typedef struct _W_OPS {
    W_ALLOC_ROUTINE Allocate;
    W_FREE_ROUTINE Free;
    ULONG Calls;
} W_OPS;

TB_EXPORT PVOID NTAPI W_AllocTag(SIZE_T size, ULONG tag);
TB_EXPORT VOID NTAPI W_FreeTag(PVOID p, ULONG tag);

W_OPS g_WOps = { W_AllocTag, W_FreeTag, 0 }; /* the allocator is also reached through this table */
ULONG g_WStats[8];
PVOID g_WDriverBlock;

/* ---- the wrappers ---- */

TB_FUNC PVOID NTAPI W_AllocFixed(SIZE_T size)
{
    return ExAllocatePoolWithTag(NonPagedPoolNx, size, W_FIXED_TAG);
}

TB_FUNC VOID NTAPI W_FreeFixed(PVOID p)
{
    ExFreePoolWithTag(p, W_FIXED_TAG);
}

TB_FUNC PVOID NTAPI W_AllocTag(SIZE_T size, ULONG tag)
{
    return ExAllocatePoolWithTag(PagedPool, size, tag);
}

TB_FUNC VOID NTAPI W_FreeTag(PVOID p, ULONG tag)
{
    ExFreePoolWithTag(p, tag);
}

TB_FUNC PVOID NTAPI W_Inner(SIZE_T size, ULONG tag)
{
    PVOID p = ExAllocatePoolWithTag(NonPagedPoolNx, size, tag);
    if (p != NULL) {
        g_WStats[7]++;
    }
    return p;
}

TB_FUNC PVOID NTAPI W_Outer(SIZE_T size, ULONG tag)
{
    g_WStats[6]++;
    return W_Inner(size + 0x10, tag);
}

/* ---- callers of the fixed-tag wrapper ---- */

TB_FUNC PVOID NTAPI W_CallerA(void)
{
    PVOID p = W_AllocFixed(0x30);
    if (p != NULL) {
        g_WStats[0]++;
    }
    return p;
}

TB_FUNC PVOID NTAPI W_CallerB(void)
{
    PVOID p = W_AllocFixed(0x40);
    if (p != NULL) {
        g_WStats[1]++;
    }
    return p;
}

TB_FUNC PVOID NTAPI W_CallerC(void)
{
    PVOID p = W_AllocFixed(0x50);
    if (p != NULL) {
        g_WStats[2]++;
    }
    return p;
}

/* ---- callers of the parameter-tag wrapper, each with its own tag ---- */

TB_FUNC PVOID NTAPI W_TagCallerA(void)
{
    PVOID p = W_AllocTag(0x60, '1aTW'); /* "WTa1" */
    g_WStats[3]++;
    return p;
}

TB_FUNC PVOID NTAPI W_TagCallerB(void)
{
    PVOID p = W_AllocTag(0x68, '2bTW'); /* "WTb2" */
    g_WStats[3] += 2;
    return p;
}

TB_FUNC PVOID NTAPI W_TagCallerC(void)
{
    PVOID p = W_AllocTag(0x70, '3cTW'); /* "WTc3" */
    g_WStats[3] += 3;
    return p;
}

/* ---- callers of the nested wrappers W_Outer -> W_Inner ---- */

TB_FUNC PVOID NTAPI W_NestCallerA(void)
{
    PVOID p = W_Outer(0x80, '1sNW'); /* "WNs1" */
    g_WStats[4]++;
    return p;
}

TB_FUNC PVOID NTAPI W_NestCallerB(void)
{
    PVOID p = W_Outer(0x90, '2sNW'); /* "WNs2" */
    g_WStats[4] += 2;
    return p;
}

/* ---- the parameter-tag wrapper called through the function-pointer table ---- */

TB_FUNC PVOID NTAPI W_OpsCaller(void)
{
    PVOID p = g_WOps.Allocate(0xa0, 'spOW'); /* "WOps" */
    g_WOps.Calls++;
    return p;
}

TB_FUNC VOID NTAPI W_OpsRelease(PVOID p)
{
    g_WOps.Free(p, 'spOW'); /* "WOps" */
    g_WOps.Calls--;
}

/* ---- workloads ---- */

static ULONG WrapIteration(ULONG leak_b)
{
    ULONG ok;
    PVOID a = W_CallerA();
    PVOID b = W_CallerB();
    PVOID c = W_CallerC();
    PVOID t1 = W_TagCallerA();
    PVOID t2 = W_TagCallerB();
    PVOID t3 = W_TagCallerC();
    PVOID n1 = W_NestCallerA();
    PVOID n2 = W_NestCallerB();
    PVOID o = W_OpsCaller();
    ok = (a != NULL && b != NULL && c != NULL && t1 != NULL && t2 != NULL && t3 != NULL && n1 != NULL &&
          n2 != NULL && o != NULL);
    if (o != NULL) W_OpsRelease(o);
    if (n2 != NULL) W_FreeTag(n2, '2sNW');
    if (n1 != NULL) W_FreeTag(n1, '1sNW');
    if (t3 != NULL) W_FreeTag(t3, '3cTW');
    if (t2 != NULL) W_FreeTag(t2, '2bTW');
    if (t1 != NULL) W_FreeTag(t1, '1aTW');
    if (c != NULL) W_FreeFixed(c);
    if (b != NULL && !leak_b) W_FreeFixed(b);
    if (a != NULL) W_FreeFixed(a);
    return ok;
}

TB_FUNC ULONG NTAPI WrapWorkBalanced(ULONG n)
{
    ULONG i, done = 0;
    for (i = 0; i < n; i++) {
        done += WrapIteration(0);
    }
    return done;
}

TB_FUNC ULONG NTAPI WrapWorkLeaky(ULONG n)
{
    ULONG i, done = 0;
    for (i = 0; i < n; i++) {
        done += WrapIteration(i % 3 == 2); /* leak: W_CallerB's block of this iteration is never freed */
    }
    return done;
}

TB_FUNC VOID NTAPI DriverUnload(PDRIVER_OBJECT DriverObject)
{
    (void)DriverObject;
    if (g_WDriverBlock != NULL) {
        W_FreeFixed(g_WDriverBlock);
    }
}

TB_INIT TB_FUNC NTSTATUS NTAPI DriverEntry(PDRIVER_OBJECT DriverObject, PUNICODE_STRING RegistryPath)
{
    (void)RegistryPath;
    g_WDriverBlock = W_AllocFixed(0x20);
    if (g_WDriverBlock == NULL) {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    DriverObject->DriverUnload = DriverUnload;
    return STATUS_SUCCESS;
}
