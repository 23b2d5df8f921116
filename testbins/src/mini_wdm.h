/* mini_wdm.h - just enough of wdm.h/ntddk.h for clang in MSVC mode (--target=*-pc-windows-msvc).
 *
 * mingw-w64's DDK headers cannot be used there (its intrin.h pulls clang's mmintrin.h and the vector typedefs
 * clash), so the testbins sources get the few types and prototypes they use from here. Layouts that a CPU
 * emulator may touch (DRIVER_OBJECT up to DriverUnload) follow the real WDK layout; lookaside lists are opaque
 * blocks at least as large as the real ones.
 */
#ifndef MINI_WDM_H
#define MINI_WDM_H

#define NTAPI __stdcall
#define NTKERNELAPI __declspec(dllimport)
#define VOID void
#ifndef NULL
#define NULL ((void *)0)
#endif
#define TRUE 1
#define FALSE 0

typedef void *PVOID;
typedef char CHAR;
typedef unsigned char UCHAR, BOOLEAN, *PUCHAR;
typedef short SHORT, CSHORT;
typedef unsigned short USHORT, WCHAR, *PWCH, *PWSTR;
typedef long LONG, NTSTATUS;
typedef unsigned long ULONG, *PULONG;
typedef unsigned long long ULONG64, ULONGLONG;
typedef long long LONG64, LONGLONG;
#ifdef _WIN64
typedef unsigned long long ULONG_PTR, SIZE_T;
#else
typedef unsigned long ULONG_PTR, SIZE_T;
#endif

#define STATUS_SUCCESS ((NTSTATUS)0x00000000L)
#define STATUS_INSUFFICIENT_RESOURCES ((NTSTATUS)0xC000009AL)
#define NT_SUCCESS(s) (((NTSTATUS)(s)) >= 0)

typedef enum _POOL_TYPE {
    NonPagedPool = 0,
    PagedPool = 1,
    NonPagedPoolMustSucceed = 2,
    NonPagedPoolCacheAligned = 4,
    PagedPoolCacheAligned = 5,
    NonPagedPoolNx = 512
} POOL_TYPE;

typedef enum _EX_POOL_PRIORITY {
    LowPoolPriority = 0,
    NormalPoolPriority = 16,
    HighPoolPriority = 32
} EX_POOL_PRIORITY;

typedef struct _UNICODE_STRING {
    USHORT Length;
    USHORT MaximumLength;
    PWSTR Buffer;
} UNICODE_STRING, *PUNICODE_STRING;

struct _DRIVER_OBJECT;
typedef VOID NTAPI DRIVER_UNLOAD(struct _DRIVER_OBJECT *DriverObject);
typedef DRIVER_UNLOAD *PDRIVER_UNLOAD;

/* Same field order and natural alignment as the WDK: DriverUnload is at 0x68 (x64) / 0x34 (x86). */
typedef struct _DRIVER_OBJECT {
    CSHORT Type;
    CSHORT Size;
    PVOID DeviceObject;
    ULONG Flags;
    PVOID DriverStart;
    ULONG DriverSize;
    PVOID DriverSection;
    PVOID DriverExtension;
    UNICODE_STRING DriverName;
    PUNICODE_STRING HardwareDatabase;
    PVOID FastIoDispatch;
    PVOID DriverInit;
    PVOID DriverStartIo;
    PDRIVER_UNLOAD DriverUnload;
    PVOID MajorFunction[28];
} DRIVER_OBJECT, *PDRIVER_OBJECT;

typedef PVOID NTAPI ALLOCATE_FUNCTION(POOL_TYPE PoolType, SIZE_T NumberOfBytes, ULONG Tag);
typedef ALLOCATE_FUNCTION *PALLOCATE_FUNCTION;
typedef VOID NTAPI FREE_FUNCTION(PVOID Buffer);
typedef FREE_FUNCTION *PFREE_FUNCTION;

struct _LOOKASIDE_LIST_EX;
typedef PVOID NTAPI ALLOCATE_FUNCTION_EX(POOL_TYPE PoolType, SIZE_T NumberOfBytes, ULONG Tag,
                                         struct _LOOKASIDE_LIST_EX *Lookaside);
typedef ALLOCATE_FUNCTION_EX *PALLOCATE_FUNCTION_EX;
typedef VOID NTAPI FREE_FUNCTION_EX(PVOID Buffer, struct _LOOKASIDE_LIST_EX *Lookaside);
typedef FREE_FUNCTION_EX *PFREE_FUNCTION_EX;

/* Opaque: the real structures are 0x80 (x64, cache aligned) / 0x80 (x86) and 0x60 / 0x48 bytes. */
typedef struct __declspec(align(64)) _NPAGED_LOOKASIDE_LIST { ULONG_PTR Opaque[0x80 / sizeof(ULONG_PTR)]; } NPAGED_LOOKASIDE_LIST, *PNPAGED_LOOKASIDE_LIST;
typedef struct __declspec(align(64)) _PAGED_LOOKASIDE_LIST { ULONG_PTR Opaque[0x80 / sizeof(ULONG_PTR)]; } PAGED_LOOKASIDE_LIST, *PPAGED_LOOKASIDE_LIST;
typedef struct _LOOKASIDE_LIST_EX { ULONG_PTR Opaque[0x60 / sizeof(ULONG_PTR)]; } LOOKASIDE_LIST_EX, *PLOOKASIDE_LIST_EX;

NTKERNELAPI PVOID NTAPI ExAllocatePool(POOL_TYPE PoolType, SIZE_T NumberOfBytes);
NTKERNELAPI PVOID NTAPI ExAllocatePoolWithTag(POOL_TYPE PoolType, SIZE_T NumberOfBytes, ULONG Tag);
NTKERNELAPI PVOID NTAPI ExAllocatePoolWithQuotaTag(POOL_TYPE PoolType, SIZE_T NumberOfBytes, ULONG Tag);
NTKERNELAPI PVOID NTAPI ExAllocatePoolWithTagPriority(POOL_TYPE PoolType, SIZE_T NumberOfBytes, ULONG Tag,
                                                      EX_POOL_PRIORITY Priority);
NTKERNELAPI VOID NTAPI ExFreePool(PVOID P);
NTKERNELAPI VOID NTAPI ExFreePoolWithTag(PVOID P, ULONG Tag);
NTKERNELAPI VOID NTAPI ExInitializeNPagedLookasideList(PNPAGED_LOOKASIDE_LIST Lookaside, PALLOCATE_FUNCTION Allocate,
                                                       PFREE_FUNCTION Free, ULONG Flags, SIZE_T Size, ULONG Tag,
                                                       USHORT Depth);
NTKERNELAPI VOID NTAPI ExInitializePagedLookasideList(PPAGED_LOOKASIDE_LIST Lookaside, PALLOCATE_FUNCTION Allocate,
                                                      PFREE_FUNCTION Free, ULONG Flags, SIZE_T Size, ULONG Tag,
                                                      USHORT Depth);
NTKERNELAPI NTSTATUS NTAPI ExInitializeLookasideListEx(PLOOKASIDE_LIST_EX Lookaside, PALLOCATE_FUNCTION_EX Allocate,
                                                       PFREE_FUNCTION_EX Free, POOL_TYPE PoolType, ULONG Flags,
                                                       SIZE_T Size, ULONG Tag, USHORT Depth);
NTKERNELAPI VOID NTAPI ExDeleteNPagedLookasideList(PNPAGED_LOOKASIDE_LIST Lookaside);
NTKERNELAPI VOID NTAPI ExDeletePagedLookasideList(PPAGED_LOOKASIDE_LIST Lookaside);
NTKERNELAPI VOID NTAPI ExDeleteLookasideListEx(PLOOKASIDE_LIST_EX Lookaside);

#endif /* MINI_WDM_H */
