#!/usr/bin/env bash
# Rebuild every testbins driver, its per-build ground truth and manifest.json, from src/.
# Usage: bash testbins/build.sh            (from anywhere; needs mingw-w64, clang 14, lld, llvm, python3)
# Byte-stable: GNU ld runs with --no-insert-timestamp and -s, lld-link with /Brepro; nothing else in the images
# depends on time or paths.  See README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
MAIN="$(cd .. && pwd)"

SOURCES="sample patterns wrappers"
BUILDS="gcc_x64_O2 gcc_x64_O0 gcc_x86_O2 gcc_x86_pushargs clang_x64 clang_x64_tail clang_x86 clang_gnu_x64"

for tool in x86_64-w64-mingw32-gcc i686-w64-mingw32-gcc x86_64-w64-mingw32-dlltool i686-w64-mingw32-dlltool \
            clang lld-link llvm-dlltool python3; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install mingw-w64 clang lld llvm)" >&2; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# ---- import libraries (ntoskrnl.exe; includes ExAllocatePool2/3 and ExFreePool2, which mingw-w64 lacks) ----
( cd "$WORK"
  x86_64-w64-mingw32-dlltool -d "$HERE/src/ntoskrnl_x64.def" -l libntoskrnl_tb64.a
  i686-w64-mingw32-dlltool -k -d "$HERE/src/ntoskrnl_x86.def" -l libntoskrnl_tb86.a
  llvm-dlltool -m i386:x86-64 -d "$HERE/src/ntoskrnl_x64.def" -l ntoskrnl_x64.lib
  llvm-dlltool -m i386 -k -d "$HERE/src/ntoskrnl_x86.def" -l ntoskrnl_x86.lib )

WARN="-Wall -Wextra -Wno-multichar -Wno-unused-parameter"
# (no -mno-stack-arg-probe here: on i686 it also turns off -maccumulate-outgoing-args, the gcc default that stores
#  arguments with mov [esp+N]; only gcc_x86_pushargs wants that)
GCC_COMMON="-ffreestanding -fno-builtin -fno-stack-protector -fno-ident $WARN -Isrc"
GCC_LINK="-shared -nostdlib -nostartfiles -s -Wl,--subsystem,native -Wl,--no-insert-timestamp"
CLANG_COMMON="-O2 -ffreestanding -fasynchronous-unwind-tables -fno-builtin -fno-stack-protector -mno-stack-arg-probe $WARN -Isrc"
LLD_COMMON="/nologo /driver /subsystem:native /nodefaultlib /Brepro /entry:DriverEntry /section:INIT,ERD"

META="$WORK/meta.tsv"   # build <TAB> arch <TAB> compiler description
: >"$META"

build_one() {  # $1 = source name, $2 = build name
    local s="$1" b="$2" out="bin/${1}_${2}.sys" obj="$WORK/${1}_${2}.obj" cc flags arch
    case "$b" in
    gcc_x64_O2|gcc_x64_O0)
        arch=x64; cc=x86_64-w64-mingw32-gcc
        if [ "$b" = gcc_x64_O2 ]; then flags="-O2"; else flags="-O0"; fi
        flags="$flags $GCC_COMMON -I/usr/x86_64-w64-mingw32/include/ddk"
        $cc $flags $GCC_LINK -Wl,--entry,DriverEntry -Wl,--image-base,0x140000000 \
            -o "$out" "src/$s.c" "$WORK/libntoskrnl_tb64.a" ;;
    gcc_x86_O2|gcc_x86_pushargs)
        arch=x86; cc=i686-w64-mingw32-gcc
        # no .eh_frame (x86 drivers have no unwind data); exports undecorated (--kill-at), as a .def would give
        flags="-O2 $GCC_COMMON -fno-asynchronous-unwind-tables -fno-unwind-tables -I/usr/i686-w64-mingw32/include/ddk"
        if [ "$b" = gcc_x86_pushargs ]; then flags="$flags -mpush-args -mno-accumulate-outgoing-args -mno-stack-arg-probe"; fi
        $cc $flags $GCC_LINK -Wl,--kill-at -Wl,--entry,_DriverEntry@8 -Wl,--image-base,0x10000 \
            -o "$out" "src/$s.c" "$WORK/libntoskrnl_tb86.a" ;;
    clang_x64|clang_x64_tail)
        arch=x64; cc=clang
        flags="--target=x86_64-pc-windows-msvc $CLANG_COMMON"
        if [ "$b" = clang_x64 ]; then flags="$flags -fno-optimize-sibling-calls"; fi
        clang $flags -c "src/$s.c" -o "$obj"
        lld-link $LLD_COMMON /machine:x64 /base:0x140000000 /out:"$out" /implib:"$WORK/junk.lib" "$obj" "$WORK/ntoskrnl_x64.lib" ;;
    clang_x86)
        arch=x86; cc=clang
        # exports come from src/<source>.def (undecorated, as MSVC drivers do it); __declspec(dllexport) would
        # export the stdcall-decorated "_Name@N" instead
        flags="--target=i686-pc-windows-msvc $CLANG_COMMON -fno-optimize-sibling-calls -DTB_EXPORT_VIA_DEF"
        clang $flags -c "src/$s.c" -o "$obj"
        lld-link $LLD_COMMON /machine:x86 /base:0x10000 /def:"src/$s.def" /out:"$out" /implib:"$WORK/junk.lib" \
            "$obj" "$WORK/ntoskrnl_x86.lib" ;;
    clang_gnu_x64)
        arch=x64; cc=clang
        flags="--target=x86_64-w64-windows-gnu $CLANG_COMMON -Wno-pragma-pack -I/usr/x86_64-w64-mingw32/include/ddk -isystem /usr/x86_64-w64-mingw32/include"
        clang $flags -c "src/$s.c" -o "$obj"
        lld-link $LLD_COMMON /machine:x64 /base:0x140000000 /out:"$out" /implib:"$WORK/junk.lib" "$obj" "$WORK/ntoskrnl_x64.lib" ;;
    *) echo "unknown build $b" >&2; exit 1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$s" "$b" "$arch" "$($cc --version | head -1) $flags" >>"$META"
}

mkdir -p bin
rm -f bin/*.sys bin/*.truth.json
for s in $SOURCES; do
    for b in $BUILDS; do
        build_one "$s" "$b"
    done
done

# ---- per-build truth files, manifest.json, checks, and the samples bundled with tagsplit ----
python3 "$HERE/tools/finish.py" "$HERE" "$META"

# dynamic cross-check of the workload/leak truth (report only; needs unicorn)
if python3 -c "import unicorn" 2>/dev/null; then
    python3 "$HERE/tools/emulate_workloads.py" 7 || echo "build.sh: WARNING: workload emulation disagrees with the truth" >&2
else
    echo "build.sh: unicorn not installed, workload emulation skipped"
fi

mkdir -p "$MAIN/tagsplit/data"
cp bin/sample_gcc_x64_O2.sys "$MAIN/tagsplit/data/sample_x64.sys"
cp bin/sample_gcc_x86_O2.sys "$MAIN/tagsplit/data/sample_x86.sys"
echo "build.sh: $(ls bin/*.sys | wc -l) drivers in testbins/bin, manifest.json written"
