#!/usr/bin/env bash
# Tests of `run`'s set-up checks, fed fake directory listings (nothing is installed or read
# from the machine). Run by `./run test`; prints one line a case and "N passed, N failed".
set -uo pipefail
source "$(dirname "$0")/../../run"
set +e

passed=0 failed=0
expect() { # expect found|missing DESCRIPTION < listing
  local want=$1 what=$2 got=missing
  has_bindgen_libclang && got=found
  if [ "$got" = "$want" ]; then
    passed=$((passed + 1)); echo "ok: $what ($got)"
  else
    failed=$((failed + 1)); echo "FAIL: $what: expected $want, got $got"
  fi
}

expect missing "empty listing" < /dev/null
expect missing "only libclang-cpp (fresh Debian 12)" <<'L'
/usr/lib/llvm-14/lib/libclang-cpp.so.14
/usr/lib/llvm-14/lib/libLLVM-14.so
L
expect missing "libclang-cpp without a version, and static archives" <<'L'
libclang-cpp.so
libclang.a
libclangBasic.a
L
expect missing "a name that only starts like libclang" <<'L'
libclang.so.bak
libclang-14.so~
libclangsupport.so
L
expect found "libclang.so (libclang-dev)" <<'L'
/usr/lib/llvm-14/lib/libclang-cpp.so.14
/usr/lib/llvm-14/lib/libclang.so
L
expect found "libclang-N.so" <<'L'
libclang-17.so
L
expect found "libclang.so.N (libclang1 without -dev)" <<'L'
/usr/lib/llvm-14/lib/libclang.so.1
L
expect found "libclang-N.so.N.N.N (ldconfig's name)" <<'L'
libclang-14.so.14.0.6
L

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
