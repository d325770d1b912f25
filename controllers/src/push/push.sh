# stackwarden push of `@NAME@`, sha256 @HASH@.
#
# Installs a set of files on a running host without restarting anything: stages them, validates
# the staged copy with the tool that owns them, swaps each live file for its new version with a
# rename beside it, reloads, and checks the reload took. On any failure after the swap it puts
# the previous files back and reloads again. Every path is under $STACKWARDEN_ROOT (empty on a
# real host), so tests run this very script in a temporary directory.
#
# POSIX sh: the SSM agent runs AWS-RunShellScript as `sh -c FILE`, which is dash on Ubuntu and
# Debian. No arrays, no `local`, no pipefail: the file list is written out in each loop.
set -u
root="${STACKWARDEN_ROOT:-}"
state="$root/var/lib/stackwarden"
stage="$state/stage/@NAME@"
backup="$state/backup/@NAME@"
# A file here marks a live file that did not exist before the swap: a rollback removes it.
created="$state/created/@NAME@"

fail() { printf 'stackwarden: %s\n' "$*" >&2; exit 1; }

rm -rf "$stage" "$backup" "$created" && mkdir -p "$stage" "$backup" "$created" \
  || fail "cannot prepare $state"

# put PATH MODE, with the content as base64 on stdin.
put() {
  mkdir -p "$(dirname "$stage$1")" && base64 -d > "$stage$1" && chmod "$2" "$stage$1" \
    || fail "cannot stage $1"
}
# fetch PATH MODE COMMAND...: stage a file from what COMMAND prints here, a secret read with
# this host's own role (only its name and version travel in this script). Written under umask
# 077, so it is never readable by others, not even while being written.
fetch() {
  fetch_path=$1 fetch_mode=$2
  shift 2
  command -v "$1" >/dev/null || fail "cannot fetch $fetch_path: $1 is not installed on this host"
  mkdir -p "$(dirname "$stage$fetch_path")" || fail "cannot stage $fetch_path"
  fetch_value=$("$@") || fail "cannot fetch $fetch_path with $*"
  (umask 077 && printf '%s' "$fetch_value" > "$stage$fetch_path") \
    && chmod "$fetch_mode" "$stage$fetch_path" || fail "cannot stage $fetch_path"
}
@FILES@

validate() {
  :
@VALIDATE@
}
reload() {
  :
@RELOAD@
}

if ! out=$(validate 2>&1); then
  rm -rf "$stage"
  fail "validation failed; nothing was installed:
$out"
fi

# Swap: each new file is copied beside the live one, then renamed over it (atomic on one file
# system). The previous version goes to the backup first; files that did not exist are noted.
for f in @PATHS@; do
  live="$root$f"
  mkdir -p "$(dirname "$live")" "$(dirname "$backup$f")" "$(dirname "$created$f")" \
    || fail "cannot create $(dirname "$live")"
  if [ -e "$live" ]; then
    cp -p "$live" "$backup$f" || fail "cannot back up $f"
  else
    : > "$created$f" || fail "cannot note $f as new"
  fi
done

restore() {
  for f in @PATHS@; do
    live="$root$f"
    if [ -e "$backup$f" ]; then
      cp -p "$backup$f" "$live.stackwarden-old" && mv -f "$live.stackwarden-old" "$live"
    elif [ -e "$created$f" ]; then
      rm -f "$live"
    fi
  done
}

for f in @PATHS@; do
  live="$root$f"
  if ! { cp -p "$stage$f" "$live.stackwarden-new" && mv -f "$live.stackwarden-new" "$live"; }; then
    restore
    fail "cannot install $f; the previous files are back"
  fi
done

if ! out=$(reload 2>&1); then
  restore
  if again=$(reload 2>&1); then
    fail "reload failed; the previous files are back and reloaded:
$out"
  fi
  fail "reload failed, and reloading the previous files failed too:
$out
$again"
fi

rm -rf "$stage" "$backup" "$created"
# The manifest a verify compares the live files with later: mode, sha256 and path of each.
for f in @PATHS@; do
  printf '%s %s %s\n' "$(stat -c %a "$root$f")" "$(sha256sum < "$root$f" | cut -d' ' -f1)" "$f"
done > "$state/@NAME@.files"
printf '%s\n' "@HASH@" > "$state/@NAME@.sha256"
echo "stackwarden: installed @NAME@ sha256:@HASH@"
