# tests/junit.sh - JUnit XML reports for tests/run and tests/hil/run (sourced by both; bash).
#
# One report per run: a <testsuites> document, one <testsuite> per suite (a tests/run step, a
# HIL guest boot), one <testcase> per test (a libtest test, a HIL payload or setup step). CI
# systems (GitHub's test reporters, GitLab, Jenkins) display it.
#
#   junit_begin FILE                      start a report (FILE's directory is created)
#   junit_suite NAME TIME                 start a suite (closes the previous one)
#   junit_case CLASS NAME TIME [failure|skipped MESSAGE [OUTPUT-FILE]]
#   junit_libtest CLASS LOG               one case per "test NAME ... ok|FAILED|ignored" line of a
#                                         cargo test log (the binary from its "Running" lines)
#   junit_hil_console LOG CLASS SUITE TIME RESULT
#                                         the suite of one HIL guest boot, from its console log
#   junit_include FILE                    the suites of another report (e.g. tests/hil/run's)
#   junit_end                             closes the last suite and writes FILE atomically
# Everything written is escaped: control characters and U+FFFE/U+FFFF (not allowed in XML 1.0)
# are dropped and invalid UTF-8 is replaced, so any program output can go into a report.

JUNIT_FILE="" JUNIT_BODY="" JUNIT_CASES="" JUNIT_SUITE=""
JUNIT_T=0 JUNIT_F=0 JUNIT_S=0 JUNIT_TIME=0   # current suite
JUNIT_TT=0 JUNIT_TF=0 JUNIT_TS=0             # whole report

# U+FFFE and U+FFFF in UTF-8: valid UTF-8 (iconv keeps them), yet not XML 1.0 characters.
JUNIT_NONCHARS=$(printf '\357\277[\276\277]')

# stdin -> stdout: text safe in an XML attribute or element.
junit_escape() {
	if command -v iconv >/dev/null 2>&1; then
		LC_ALL=C tr -d '\000-\010\013\014\016-\037\177' | iconv -c -f UTF-8 -t UTF-8 2>/dev/null |
			LC_ALL=C sed "s/$JUNIT_NONCHARS//g"
	else
		LC_ALL=C tr -d '\000-\010\013\014\016-\037\177\200-\377'
	fi | sed 's/&/\&amp;/g; s/</\&lt;/g; s/>/\&gt;/g; s/"/\&quot;/g'
}
junit_attr() { printf '%s' "$1" | junit_escape | tr '\n' ' '; }

junit_begin() {
	JUNIT_FILE=$1
	mkdir -p "$(dirname "$JUNIT_FILE")" || return 1
	JUNIT_BODY=$(mktemp) && JUNIT_CASES=$(mktemp) || return 1
	JUNIT_SUITE="" JUNIT_TT=0 JUNIT_TF=0 JUNIT_TS=0
}

junit_flush_suite() {
	[ -n "$JUNIT_SUITE" ] || return 0
	printf '  <testsuite name="%s" tests="%d" failures="%d" errors="0" skipped="%d" time="%s">\n' \
		"$(junit_attr "$JUNIT_SUITE")" "$JUNIT_T" "$JUNIT_F" "$JUNIT_S" "$JUNIT_TIME" >>"$JUNIT_BODY"
	cat "$JUNIT_CASES" >>"$JUNIT_BODY"
	echo '  </testsuite>' >>"$JUNIT_BODY"
	: >"$JUNIT_CASES"
	JUNIT_SUITE=""
}

junit_suite() { # name, time (seconds)
	junit_flush_suite
	JUNIT_SUITE=$1 JUNIT_TIME=${2:-0} JUNIT_T=0 JUNIT_F=0 JUNIT_S=0
}

junit_case() { # class, name, time, [failure|skipped, message, [output file]]
	local class=$1 name=$2 time=${3:-0} kind=${4:-} msg=${5:-} out=${6:-}
	[ -n "$JUNIT_SUITE" ] || junit_suite "$class" 0
	JUNIT_T=$((JUNIT_T + 1)) JUNIT_TT=$((JUNIT_TT + 1))
	{
		printf '    <testcase classname="%s" name="%s" time="%s"' "$(junit_attr "$class")" "$(junit_attr "$name")" "$time"
		case $kind in
		failure)
			printf '>\n      <failure message="%s">' "$(junit_attr "$msg")"
			[ -n "$out" ] && [ -f "$out" ] && tail -n 200 "$out" | junit_escape
			printf '</failure>\n    </testcase>\n' ;;
		skipped) printf '>\n      <skipped message="%s"/>\n    </testcase>\n' "$(junit_attr "$msg")" ;;
		*) printf '/>\n' ;;
		esac
	} >>"$JUNIT_CASES"
	case $kind in
	failure) JUNIT_F=$((JUNIT_F + 1)) JUNIT_TF=$((JUNIT_TF + 1)) ;;
	skipped) JUNIT_S=$((JUNIT_S + 1)) JUNIT_TS=$((JUNIT_TS + 1)) ;;
	esac
}

junit_libtest() { # class prefix, cargo test log
	local prefix=$1 log=$2 bin="" line name result
	[ -f "$log" ] || return 0
	while IFS= read -r line; do
		case $line in
		*"Running "*)
			bin=${line#*Running }
			bin=${bin%% *} ;;
		"test "*" ... "*)
			name=${line#test }
			result=${name##* ... }
			name=${name% ... *}
			case $result in
			ok*) junit_case "$prefix ${bin:-tests}" "$name" 0 ;;
			ignored*) junit_case "$prefix ${bin:-tests}" "$name" 0 skipped "ignored" ;;
			FAILED*) junit_case "$prefix ${bin:-tests}" "$name" 0 failure "failed (the step's output is in the failure of its own case)" ;;
			esac ;;
		esac
	done < <(LC_ALL=C tr -d '\r' <"$log")
}

junit_include() { # another report written by junit_end
	[ -f "$1" ] || return 0
	junit_flush_suite
	sed '1,2d;$d' "$1" >>"$JUNIT_BODY"
	local t f s
	read -r t f s < <(sed -n '2s/.* tests="\([0-9]*\)" failures="\([0-9]*\)" errors="0" skipped="\([0-9]*\)".*/\1 \2 \3/p' "$1")
	JUNIT_TT=$((JUNIT_TT + ${t:-0})) JUNIT_TF=$((JUNIT_TF + ${f:-0})) JUNIT_TS=$((JUNIT_TS + ${s:-0}))
}

junit_end() { # [name of the report]
	[ -n "$JUNIT_FILE" ] || return 0
	junit_flush_suite
	{
		echo '<?xml version="1.0" encoding="UTF-8"?>'
		printf '<testsuites name="%s" tests="%d" failures="%d" errors="0" skipped="%d">\n' \
			"$(junit_attr "${1:-dioxide}")" "$JUNIT_TT" "$JUNIT_TF" "$JUNIT_TS"
		cat "$JUNIT_BODY"
		echo '</testsuites>'
	} >"$JUNIT_FILE.tmp" && mv "$JUNIT_FILE.tmp" "$JUNIT_FILE"
	rm -f "$JUNIT_BODY" "$JUNIT_CASES"
}

# junit_hil_console: the suite of one tests/hil/run guest boot: a case per setup step and
# payload (from the console's "HIL: BEGIN/PASS/FAIL/PENDING" lines; a pending failure is a
# skipped case), one for the boot itself (the guest's result), and a failure for a payload that
# began but never ended.
junit_hil_console() { # console log, class, suite name, seconds, result (PASS or why not)
	local log=$1 class=$2 took=$4 result=$5 kind name t msg out
	junit_suite "$3" "$took"
	out=$(mktemp)
	while IFS=$'\t' read -r kind name t msg; do
		case $kind in
		PASS) junit_case "$class" "$name" "$t" ;;
		PENDING) junit_case "$class" "$name" "$t" skipped "pending: $msg" ;;
		FAIL | NORESULT)
			awk -v n="$name" 'index($0, "HIL: BEGIN " n ":") == 1 { on = 1; next }
			                  on && (index($0, "HIL: FAIL " n ":") == 1 || index($0, "HIL: FAIL " n " ") == 1) { on = 0 }
			                  on { print }' "$log" >"$out"
			[ -s "$out" ] || tail -n 60 "$log" >"$out"
			[ "$kind" = NORESULT ] && msg="began but reported no result (the guest stopped: $result)"
			junit_case "$class" "$name" "$t" failure "$msg" "$out" ;;
		esac
	done < <(awk '
		/^HIL: BEGIN / { n = substr($0, 12); match(n, /^[^ ]+/); n = substr(n, 1, RLENGTH); sub(/:$/, "", n); cur = n; next }
		/^HIL: (PASS|FAIL|PENDING) / {
			kind = $2; rest = substr($0, length("HIL: " kind " ") + 1)
			match(rest, /^[^ ]+/); name = substr(rest, 1, RLENGTH); tail = substr(rest, RLENGTH + 1)
			sub(/:$/, "", name)
			t = 0; if (match(tail, /\([0-9.]+s/)) t = substr(tail, RSTART + 1, RLENGTH - 2)
			sub(/^[: ]+/, "", tail)
			if (name == cur) cur = ""
			printf "%s\t%s\t%s\t%s\n", kind, name, t, tail }
		END { if (cur != "") printf "NORESULT\t%s\t0\t\n", cur }' "$log")
	if [ "$result" = PASS ]; then
		junit_case "$class" "guest result" "$took"
	else
		tail -n 60 "$log" >"$out"
		junit_case "$class" "guest result" "$took" failure "$result" "$out"
	fi
	rm -f "$out"
}
