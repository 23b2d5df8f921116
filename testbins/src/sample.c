/* sample.c - the bundled demo driver for tagsplit.
 *
 * A small, plausible driver whose every pool allocation uses ONE tag, 'Smpl' (PoolMon display order; the C literal
 * is 'lpmS' because x86 is little-endian). tagsplit's job on this driver: find the 8 call sites below and give each
 * allocation site its own tag.
 *
 *   function            call                                  size
 *   DriverEntry (INIT)  ExAllocatePoolWithTag  'Smpl'         0x20  (settings block, freed in DriverUnload)
 *   SampleInitLookaside ExInitializeNPagedLookasideList 'Smpl' 0x70
 *   SampleCreateContext ExAllocatePoolWithTag  'Smpl'         0x48  (SAMPLE_CONTEXT)
 *   SampleAllocBuffer   ExAllocatePoolWithTag  'Smpl'         0x200 (paged data buffer)
 *   SampleAllocRecord   ExAllocatePoolWithTag  'Smpl'         0x58  (work-item-like record)
 *   SampleFreeContext / SampleFreeBuffer / SampleFreeRecord / DriverUnload: ExFreePoolWithTag 'Smpl'
 *
 * Workloads for a CPU emulator (plain integer argument, only pool APIs are called, no CRT):
 *   SampleWorkBalanced(n): n x (context + buffer + record), all freed        -> returns n
 *   SampleWorkLeaky(n):    same, but the record of every iteration i with i % 3 == 2 is never freed
 *                          -> leaks n / 3 blocks of 0x58 bytes, all from the SampleAllocRecord site.
 */
#include "compat.h"

#define SAMPLE_TAG 'lpmS' /* displayed "Smpl" */

#define SAMPLE_CONTEXT_SIZE 0x48
#define SAMPLE_BUFFER_SIZE 0x200
#define SAMPLE_RECORD_SIZE 0x58
#define SAMPLE_LOOKASIDE_ENTRY_SIZE 0x70
#define SAMPLE_SETTINGS_SIZE 0x20

typedef struct _SAMPLE_CONTEXT {
    ULONG Magic;
    ULONG Generation;
    PVOID Buffer;
    PVOID Records[6];
} SAMPLE_CONTEXT, *PSAMPLE_CONTEXT; /* 0x48 on x64 */

typedef struct _SAMPLE_RECORD {
    ULONG Sequence;
    ULONG Flags;
    PVOID Context;
} SAMPLE_RECORD, *PSAMPLE_RECORD;

/* Global state: plain counters and pointers. */
ULONG g_SampleGeneration;
ULONG g_SampleSequence;
ULONG g_SampleLive;
PVOID g_SampleSettings;
ULONG g_SampleLookasideReady;
NPAGED_LOOKASIDE_LIST g_SampleLookaside;

TB_FUNC PSAMPLE_CONTEXT NTAPI SampleCreateContext(void)
{
    PSAMPLE_CONTEXT ctx = (PSAMPLE_CONTEXT)ExAllocatePoolWithTag(NonPagedPoolNx, SAMPLE_CONTEXT_SIZE, SAMPLE_TAG);
    if (ctx != NULL) {
        ctx->Magic = 0x43545853;
        ctx->Generation = ++g_SampleGeneration;
        ctx->Buffer = NULL;
        g_SampleLive++;
    }
    return ctx;
}

TB_FUNC VOID NTAPI SampleFreeContext(PSAMPLE_CONTEXT ctx)
{
    ctx->Magic = 0;
    g_SampleLive--;
    ExFreePoolWithTag(ctx, SAMPLE_TAG);
}

TB_FUNC PVOID NTAPI SampleAllocBuffer(void)
{
    PUCHAR buf = (PUCHAR)ExAllocatePoolWithTag(PagedPool, SAMPLE_BUFFER_SIZE, SAMPLE_TAG);
    if (buf != NULL) {
        buf[0] = 0xB5;
        buf[SAMPLE_BUFFER_SIZE - 1] = 0xE5;
        g_SampleLive++;
    }
    return buf;
}

TB_FUNC VOID NTAPI SampleFreeBuffer(PVOID buf)
{
    ((PUCHAR)buf)[0] = 0;
    g_SampleLive--;
    ExFreePoolWithTag(buf, SAMPLE_TAG);
}

TB_FUNC PSAMPLE_RECORD NTAPI SampleAllocRecord(PSAMPLE_CONTEXT ctx)
{
    PSAMPLE_RECORD rec = (PSAMPLE_RECORD)ExAllocatePoolWithTag(NonPagedPoolNx, SAMPLE_RECORD_SIZE, SAMPLE_TAG);
    if (rec != NULL) {
        rec->Sequence = ++g_SampleSequence;
        rec->Flags = 1;
        rec->Context = ctx;
        g_SampleLive++;
    }
    return rec;
}

TB_FUNC VOID NTAPI SampleFreeRecord(PSAMPLE_RECORD rec)
{
    rec->Flags = 0;
    rec->Context = NULL;
    g_SampleLive--;
    ExFreePoolWithTag(rec, SAMPLE_TAG);
}

TB_FUNC VOID NTAPI SampleInitLookaside(void)
{
    ExInitializeNPagedLookasideList(&g_SampleLookaside, NULL, NULL, 0, SAMPLE_LOOKASIDE_ENTRY_SIZE, SAMPLE_TAG, 0);
    g_SampleLookasideReady = 1;
}

/* One iteration's worth of work; `keep_record` decides whether the record is freed. */
static ULONG SampleIteration(ULONG keep_record)
{
    ULONG ok = 0;
    PSAMPLE_CONTEXT ctx = SampleCreateContext();
    PVOID buf = SampleAllocBuffer();
    PSAMPLE_RECORD rec = SampleAllocRecord(ctx);
    if (ctx != NULL && buf != NULL && rec != NULL) {
        ok = 1;
    }
    if (rec != NULL && !keep_record) {
        SampleFreeRecord(rec);
    }
    if (buf != NULL) {
        SampleFreeBuffer(buf);
    }
    if (ctx != NULL) {
        SampleFreeContext(ctx);
    }
    return ok;
}

TB_FUNC ULONG NTAPI SampleWorkBalanced(ULONG iterations)
{
    ULONG i, done = 0;
    for (i = 0; i < iterations; i++) {
        done += SampleIteration(0);
    }
    return done;
}

TB_FUNC ULONG NTAPI SampleWorkLeaky(ULONG iterations)
{
    ULONG i, done = 0;
    for (i = 0; i < iterations; i++) {
        done += SampleIteration(i % 3 == 2); /* leak: this iteration's record is never freed */
    }
    return done;
}

TB_FUNC VOID NTAPI DriverUnload(PDRIVER_OBJECT DriverObject)
{
    (void)DriverObject;
    if (g_SampleLookasideReady) {
        ExDeleteNPagedLookasideList(&g_SampleLookaside);
        g_SampleLookasideReady = 0;
    }
    if (g_SampleSettings != NULL) {
        ExFreePoolWithTag(g_SampleSettings, SAMPLE_TAG);
        g_SampleSettings = NULL;
    }
}

TB_INIT TB_FUNC NTSTATUS NTAPI DriverEntry(PDRIVER_OBJECT DriverObject, PUNICODE_STRING RegistryPath)
{
    PULONG settings;
    (void)RegistryPath;
    settings = (PULONG)ExAllocatePoolWithTag(NonPagedPoolNx, SAMPLE_SETTINGS_SIZE, SAMPLE_TAG);
    if (settings == NULL) {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    settings[0] = 1;
    settings[1] = 0;
    g_SampleSettings = settings;
    SampleInitLookaside();
    DriverObject->DriverUnload = DriverUnload;
    return STATUS_SUCCESS;
}
