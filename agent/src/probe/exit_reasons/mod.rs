//! Names of KVM exit reasons as the `kvm:kvm_exit` tracepoint reports them, per ISA: VMX (isa 1),
//! SVM (isa 2) and PVM (isa 3).
//!
//! The kernel keeps its own name tables for VMX and SVM and prints them in the event's format file
//! (`/sys/kernel/tracing/events/kvm/kvm_exit/format`, `print fmt:` line) as `__print_symbolic(...)`
//! tables. A host's own tables are the best names for that host: they know the reasons its kernel
//! has (and only those), so the agent reads them from there (this module's parser) and keeps
//! built-in copies (`tables`) for hosts whose format file has none it can attribute to an ISA.
//!
//! Name formats:
//! - VMX: the name of the basic reason (`reason & 0xffff`), then `|FLAG` for each flag bit set in
//!   the upper 16 bits (`FAILED_VMENTRY`, `SGX_ENCLAVE_MODE`), and `|0x........` for any other bit:
//!   `0x8000_0021` is `INVALID_STATE|FAILED_VMENTRY`.
//! - SVM: the kernel's name of the whole reason, e.g. `io`, `PF excp`, `invalid_guest_state` (-1).
//! - PVM: an exception vector 0..31 is `<mnemonic> excp` like SVM's (`PF excp`), the PVM codes are
//!   lower case (`syscall`, `hypercall`, `eretu`, `erets`, `interrupt`, `int80`).
//! - A reason with no name is `reason_<decimal>` (for VMX the basic reason, flags still appended);
//!   an ISA this module does not know is `isa<N>_reason_<decimal>`.

use std::collections::BTreeMap;

mod tables;

use tables::{PVM_REASONS, SVM_REASONS, VMX_FLAGS, VMX_REASONS};

const ISA_VMX: u32 = 1;
const ISA_SVM: u32 = 2;
const ISA_PVM: u32 = 3;

/// Exit-reason names per ISA, from the host's kvm_exit format file where it has them, else built in.
#[derive(Clone, Debug)]
pub struct ExitReasonNames {
    vmx: Table,
    svm: Table,
    pvm: Table,
}

/// One ISA's names by reason value, and whether they came from the format file.
#[derive(Clone, Debug)]
struct Table {
    names: BTreeMap<u32, String>,
    from_format: bool,
}

impl Table {
    fn builtin(entries: &[(u32, &str)]) -> Self {
        let mut names = BTreeMap::new();
        for &(value, name) in entries {
            // First entry wins, as in the kernel's __print_symbolic().
            names.entry(value).or_insert_with(|| name.to_owned());
        }
        Table {
            names,
            from_format: false,
        }
    }

    fn name(&self, reason: u32) -> String {
        self.names
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("reason_{reason}"))
    }
}

impl ExitReasonNames {
    /// Built-in tables only (VMX and SVM as of Linux 6.18, PVM as in the module documentation).
    pub fn builtin() -> Self {
        ExitReasonNames {
            vmx: Table::builtin(VMX_REASONS),
            svm: Table::builtin(SVM_REASONS),
            pvm: Table::builtin(PVM_REASONS),
        }
    }

    /// Tables parsed from a kvm_exit `print fmt:` text (the part after "print fmt: "), falling back to the
    /// built-in table for any ISA the text does not cover. Never fails; `source(isa)` says where each came from.
    ///
    /// The whole format file is accepted too: only `__print_symbolic(` tables of `exit_reason` are
    /// read, and each goes to the ISA its `isa == N` condition selects (see `parse_tables`). The
    /// first table found for an ISA replaces that ISA's built-in table whole.
    pub fn from_print_fmt(print_fmt: &str) -> Self {
        let mut names = Self::builtin();
        for (isa, entries) in parse_tables(print_fmt) {
            let table = match isa {
                ISA_VMX => &mut names.vmx,
                ISA_SVM => &mut names.svm,
                ISA_PVM => &mut names.pvm,
                _ => continue,
            };
            if !table.from_format {
                *table = Table {
                    names: entries,
                    from_format: true,
                };
            }
        }
        names
    }

    /// The name of `reason` for `isa`: e.g. (1, 30) -> "IO_INSTRUCTION", (1, 0x8000_0021) ->
    /// "INVALID_STATE|FAILED_VMENTRY", (2, 0x7b) -> "io", (2, 0x4e) -> "PF excp", (3, 1<<16) -> "syscall",
    /// (3, 14) -> "PF excp"; unknown reasons -> `reason_<decimal>`; unknown isa -> `isa<N>_reason_<decimal>`.
    pub fn name(&self, isa: u32, reason: u32) -> String {
        match isa {
            ISA_VMX => {
                // The basic reason is the low 16 bits; the kernel looks it up the same way.
                let mut name = self.vmx.name(reason & 0xffff);
                let mut flags = reason & !0xffff;
                for &(bit, flag) in VMX_FLAGS {
                    if flags & bit != 0 {
                        name.push('|');
                        name.push_str(flag);
                        flags &= !bit;
                    }
                }
                if flags != 0 {
                    name.push_str(&format!("|{flags:#010x}"));
                }
                name
            }
            ISA_SVM => self.svm.name(reason),
            ISA_PVM => self.pvm.name(reason),
            _ => format!("isa{isa}_reason_{reason}"),
        }
    }

    /// "format file" or "built-in" for isa 1/2/3; "built-in" for any other ISA, whose names are
    /// made up here.
    pub fn source(&self, isa: u32) -> &'static str {
        let from_format = match isa {
            ISA_VMX => self.vmx.from_format,
            ISA_SVM => self.svm.from_format,
            ISA_PVM => self.pvm.from_format,
            _ => false,
        };
        if from_format {
            "format file"
        } else {
            "built-in"
        }
    }

    /// Name of an ISA: 1 -> "vmx", 2 -> "svm", 3 -> "pvm", other -> `isa<N>`.
    pub fn isa_name(isa: u32) -> String {
        match isa {
            ISA_VMX => "vmx".to_owned(),
            ISA_SVM => "svm".to_owned(),
            ISA_PVM => "pvm".to_owned(),
            _ => format!("isa{isa}"),
        }
    }
}

/// The `__print_symbolic(` tables of `exit_reason` in `text`, each with the ISA it is printed for.
///
/// Kernels print kvm_exit's reason as a ternary on `isa`, in these shapes (macros expanded by the
/// preprocessor, so `KVM_ISA_VMX` reads `1`; the names are accepted too):
/// - 4.19: `(REC->isa == 1) ? __print_symbolic(REC->exit_reason, VMX...) : __print_symbolic(REC->exit_reason, SVM...)`
/// - 5.15, 6.18: the same with `REC->exit_reason & 0xffff` for VMX, then `__print_flags` for its flags
/// - the PVM RFC's trace.h (2024): `(isa == 1) ? VMX : ((isa == 2) ? SVM : PVM)`
/// - old kernels that named reasons from a kernel array
///   (`ftrace_print_symbols_seq(p, REC->exit_reason, kvm_x86_ops->exit_reasons_str)`): no table
///
/// A table right after `isa == N) ?` is ISA N's. A table right after `:` is the else branch: the
/// ISA of 1, 2, 3 that no `isa ==` test before it has named (SVM after `isa == 1 ?`, PVM after
/// `isa == 1` and `isa == 2`). Any other table, or one that does not parse, is left out, so its ISA
/// keeps the built-in names rather than a guess.
fn parse_tables(text: &str) -> Vec<(u32, BTreeMap<u32, String>)> {
    const MARK: &str = "__print_symbolic(";
    let mut tables = Vec::new();
    let mut pos = 0;
    while let Some(found) = text[pos..].find(MARK) {
        let start = pos + found;
        let args = start + MARK.len();
        pos = args;
        let Some((value_expr, entries, used)) = parse_symbolic_args(&text[args..]) else {
            continue;
        };
        pos = args + used;
        if !value_expr.contains("exit_reason") {
            continue;
        }
        if let Some(isa) = branch_isa(&text[..start]) {
            tables.push((isa, entries));
        }
    }
    tables
}

/// The ISA whose branch of an `isa` ternary ends at the end of `before`, if that can be told.
fn branch_isa(before: &str) -> Option<u32> {
    let head = before.trim_end_matches(|c: char| c.is_whitespace() || c == '(');
    let tests = isa_tests(head);
    if let Some(cond) = head.strip_suffix('?') {
        // Then branch: the test must be what the `?` applies to, e.g. "(REC->isa == 1) ?".
        let &(end, isa) = tests.last()?;
        let between = &cond[end.min(cond.len())..];
        between
            .chars()
            .all(|c| c.is_whitespace() || c == ')')
            .then_some(isa)
    } else if head.ends_with(':') && !tests.is_empty() {
        (ISA_VMX..=ISA_PVM).find(|isa| !tests.iter().any(|&(_, tested)| tested == *isa))
    } else {
        None
    }
}

/// Every `isa == N` test in `text`: where its value ends, and N.
fn isa_tests(text: &str) -> Vec<(usize, u32)> {
    let mut tests = Vec::new();
    let mut pos = 0;
    while let Some(found) = text[pos..].find("isa") {
        let at = pos + found;
        pos = at + "isa".len();
        // A whole word: "REC->isa", not "kvm_isa" or "isa_x".
        let word_before = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let Some(rest) = text[pos..].trim_start().strip_prefix("==") else {
            continue;
        };
        if word_before {
            continue;
        }
        let value = rest.trim_start();
        let len = value
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(value.len());
        let token = &value[..len];
        let isa = match token {
            "KVM_ISA_VMX" => Some(ISA_VMX),
            "KVM_ISA_SVM" => Some(ISA_SVM),
            "KVM_ISA_PVM" => Some(ISA_PVM),
            _ => eval(token),
        };
        if let Some(isa) = isa {
            let end = text.len() - value.len() + len;
            tests.push((end, isa));
        }
    }
    tests
}

/// The arguments of a `__print_symbolic(` call (`args` starts right after the parenthesis): the
/// value expression, the `{ value, "name" }` entries, and the length up to and including the
/// closing parenthesis. None if they are not all of that form, or there are no entries.
fn parse_symbolic_args(args: &str) -> Option<(&str, BTreeMap<u32, String>, usize)> {
    let mut depth = 0u32;
    let mut comma = None;
    for (i, c) in args.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return None,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                comma = Some(i);
                break;
            }
            _ => {}
        }
    }
    let comma = comma?;
    let value_expr = args[..comma].trim();
    let mut rest = &args[comma + 1..];
    let mut entries = BTreeMap::new();
    loop {
        rest = rest.trim_start().strip_prefix('{')?;
        let value_end = rest.find(',')?;
        let value = eval(&rest[..value_end])?;
        let (name, after) = parse_c_string(rest[value_end + 1..].trim_start())?;
        rest = after.trim_start().strip_prefix('}')?.trim_start();
        entries.entry(value).or_insert(name);
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            rest = rest.strip_prefix(')')?;
            break;
        }
    }
    Some((value_expr, entries, args.len() - rest.len()))
}

/// A C string literal at the start of `text`: its value and the text after it.
fn parse_c_string(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &body[i + 1..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                value.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    other => other,
                });
            }
            _ => value.push(c),
        }
    }
    None
}

/// The value of a table entry's C expression as the kernel compares it with a u32 reason: integer
/// literals (decimal, 0x hex, 0 octal, u/l suffixes), unary `-`, `+ -`, `<<` and parentheses,
/// which covers `0`, `0x040 + 14`, `-1` (0xffffffff) and PVM's `(1UL << 16)`. None for anything
/// else, or a value that does not fit 32 bits.
fn eval(expr: &str) -> Option<u32> {
    let tokens = tokenize(expr)?;
    let mut parser = Parser {
        tokens: &tokens,
        pos: 0,
        depth: 0,
    };
    let value = parser.shift()?;
    if parser.pos != tokens.len() || value < i64::from(i32::MIN) || value > i64::from(u32::MAX) {
        return None;
    }
    // C's conversion to unsigned int: -1 is 0xffffffff.
    Some(value as u32)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Token {
    Num(i64),
    Op(&'static str),
}

fn tokenize(expr: &str) -> Option<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut rest = expr.trim_start();
    while !rest.is_empty() {
        if let Some(op) = ["<<", "+", "-", "(", ")"]
            .into_iter()
            .find(|op| rest.starts_with(*op))
        {
            tokens.push(Token::Op(op));
            rest = &rest[op.len()..];
        } else {
            let len = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            if len == 0 {
                return None;
            }
            let literal = rest[..len].trim_end_matches(['u', 'U', 'l', 'L']);
            let value = if let Some(hex) = literal
                .strip_prefix("0x")
                .or_else(|| literal.strip_prefix("0X"))
            {
                i64::from_str_radix(hex, 16)
            } else if literal.len() > 1 && literal.starts_with('0') {
                i64::from_str_radix(&literal[1..], 8)
            } else {
                literal.parse()
            };
            tokens.push(Token::Num(value.ok()?));
            rest = &rest[len..];
        }
        rest = rest.trim_start();
    }
    Some(tokens)
}

/// Recursive descent over C's `<<` < `+ -` < unary `-` and parentheses.
struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    /// Nesting so far, bounded so that garbage like "((((..." cannot exhaust the stack.
    depth: u32,
}

impl Parser<'_> {
    fn eat(&mut self, op: &str) -> bool {
        let found = matches!(self.tokens.get(self.pos), Some(Token::Op(o)) if *o == op);
        if found {
            self.pos += 1;
        }
        found
    }

    fn shift(&mut self) -> Option<i64> {
        let mut value = self.sum()?;
        while self.eat("<<") {
            let by = u32::try_from(self.sum()?).ok().filter(|by| *by < 63)?;
            value = value.checked_mul(1i64 << by)?;
        }
        Some(value)
    }

    fn sum(&mut self) -> Option<i64> {
        let mut value = self.unary()?;
        loop {
            if self.eat("+") {
                value = value.checked_add(self.unary()?)?;
            } else if self.eat("-") {
                value = value.checked_sub(self.unary()?)?;
            } else {
                return Some(value);
            }
        }
    }

    fn unary(&mut self) -> Option<i64> {
        self.depth += 1;
        if self.depth > 16 {
            return None;
        }
        let value = if self.eat("-") {
            self.unary()?.checked_neg()?
        } else if self.eat("(") {
            let value = self.shift()?;
            self.eat(")").then_some(value)?
        } else {
            let &Token::Num(value) = self.tokens.get(self.pos)? else {
                return None;
            };
            self.pos += 1;
            value
        };
        self.depth -= 1;
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_6_18: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kvm_exit-format-linux-6.18-x86.txt"
    ));
    const LINUX_5_15: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kvm_exit-format-linux-5.15-x86.txt"
    ));
    const LINUX_4_19: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kvm_exit-format-linux-4.19-x86.txt"
    ));

    /// The part of a format file after "print fmt: ", as the agent passes it.
    fn print_fmt(format_file: &str) -> &str {
        format_file
            .lines()
            .find_map(|line| line.strip_prefix("print fmt: "))
            .expect("format file has a print fmt line")
    }

    fn parsed(format_file: &str) -> ExitReasonNames {
        let names = ExitReasonNames::from_print_fmt(print_fmt(format_file));
        assert_eq!(names.source(1), "format file");
        assert_eq!(names.source(2), "format file");
        assert_eq!(names.source(3), "built-in");
        names
    }

    #[test]
    fn linux_6_18_format() {
        let names = parsed(LINUX_6_18);
        assert_eq!(names.vmx.names.len(), 65);
        assert_eq!(names.svm.names.len(), 110);
        assert_eq!(names.name(1, 0), "EXCEPTION_NMI");
        assert_eq!(names.name(1, 30), "IO_INSTRUCTION");
        assert_eq!(names.name(1, 85), "MSR_WRITE_IMM");
        assert_eq!(names.name(1, 0x8000_0021), "INVALID_STATE|FAILED_VMENTRY");
        assert_eq!(names.name(2, 0x7b), "io");
        assert_eq!(names.name(2, 0x40), "DE excp"); // { 0x040 + 0, "DE excp" }
        assert_eq!(names.name(2, 0x4e), "PF excp"); // { 0x040 + 14, "PF excp" }
        assert_eq!(names.name(2, 0xa6), "idle-halt");
        assert_eq!(names.name(2, 0x400), "npf");
        assert_eq!(names.name(2, 0x8000_fffd), "vmgexit_hypervisor_feature");
        assert_eq!(names.name(2, u32::MAX), "invalid_guest_state"); // { -1, ... }
    }

    #[test]
    fn linux_5_15_format() {
        let names = parsed(LINUX_5_15);
        assert_eq!(names.vmx.names.len(), 61);
        assert_eq!(names.svm.names.len(), 103);
        assert_eq!(names.name(1, 7), "INTERRUPT_WINDOW");
        assert_eq!(names.name(1, 74), "BUS_LOCK");
        // NOTIFY (75) and idle-halt (0xa6) came after 5.15: the host's own table has no name for them.
        assert_eq!(names.name(1, 75), "reason_75");
        assert_eq!(names.name(2, 0xa6), "reason_166");
        assert_eq!(names.name(1, 0x8000_0021), "INVALID_STATE|FAILED_VMENTRY");
        assert_eq!(names.name(2, 0x4e), "PF excp");
        assert_eq!(names.name(2, 0x53), "XF excp");
        assert_eq!(names.name(2, 0x8000_0005), "vmgexit_ap_jump_table");
        assert_eq!(names.name(2, u32::MAX), "invalid_guest_state");
    }

    #[test]
    fn linux_4_19_format() {
        // No `& 0xffff` on VMX and no flags in this kernel's print fmt; names still use the basic reason.
        let names = parsed(LINUX_4_19);
        assert_eq!(names.vmx.names.len(), 56);
        assert_eq!(names.svm.names.len(), 92);
        assert_eq!(names.name(1, 7), "PENDING_INTERRUPT");
        assert_eq!(names.name(1, 0x8000_0021), "INVALID_STATE|FAILED_VMENTRY");
        assert_eq!(names.name(1, 74), "reason_74");
        assert_eq!(names.name(2, 0x4e), "PF excp");
        assert_eq!(names.name(2, 0x402), "avic_unaccelerated_access");
        assert_eq!(names.name(2, 0x403), "reason_1027");
        assert_eq!(names.name(2, u32::MAX), "invalid_guest_state");
    }

    #[test]
    fn whole_format_file_reads_the_same() {
        let whole = ExitReasonNames::from_print_fmt(LINUX_6_18);
        let part = ExitReasonNames::from_print_fmt(print_fmt(LINUX_6_18));
        assert_eq!(whole.vmx.names, part.vmx.names);
        assert_eq!(whole.svm.names, part.svm.names);
        assert_eq!(whole.source(1), "format file");
    }

    #[test]
    fn builtin_tables_are_linux_6_18() {
        let builtin = ExitReasonNames::builtin();
        let host = parsed(LINUX_6_18);
        assert_eq!(builtin.vmx.names, host.vmx.names);
        assert_eq!(builtin.svm.names, host.svm.names);
        assert_eq!(VMX_REASONS.len(), host.vmx.names.len());
        assert_eq!(SVM_REASONS.len(), host.svm.names.len());
        for isa in 1..=3 {
            assert_eq!(builtin.source(isa), "built-in");
        }
    }

    #[test]
    fn pvm_names() {
        let names = ExitReasonNames::builtin();
        assert_eq!(names.name(3, 1 << 16), "syscall");
        assert_eq!(names.name(3, 2 << 16), "hypercall");
        assert_eq!(names.name(3, 3 << 16), "eretu");
        assert_eq!(names.name(3, 4 << 16), "erets");
        assert_eq!(names.name(3, 5 << 16), "interrupt");
        assert_eq!(names.name(3, 6 << 16), "int80");
        assert_eq!(names.name(3, 14), "PF excp");
        assert_eq!(names.name(3, 0), "DE excp");
        assert_eq!(names.name(3, 15), "vec15 excp");
        assert_eq!(names.name(3, 1025), "failed_vmentry");
        assert_eq!(names.name(3, 7 << 16), "reason_458752");
        assert_eq!(names.name(3, 32), "reason_32");
        // Every vector has a name.
        assert!((0..32).all(|vector| names.name(3, vector).ends_with(" excp")));
    }

    #[test]
    fn unknown_reasons_flags_and_isas() {
        let names = ExitReasonNames::builtin();
        assert_eq!(names.name(1, 0xffff), "reason_65535");
        assert_eq!(names.name(1, 0x8000_ffff), "reason_65535|FAILED_VMENTRY");
        assert_eq!(
            names.name(1, 0x0800_0000 | 0x1e), // 30: IO_INSTRUCTION
            "IO_INSTRUCTION|SGX_ENCLAVE_MODE"
        );
        assert_eq!(
            names.name(1, 0x8800_0030),
            "EPT_VIOLATION|FAILED_VMENTRY|SGX_ENCLAVE_MODE"
        );
        assert_eq!(names.name(1, 0x1000_001e), "IO_INSTRUCTION|0x10000000");
        assert_eq!(names.name(2, 0x1234), "reason_4660");
        assert_eq!(names.name(0, 5), "isa0_reason_5");
        assert_eq!(names.name(9, 30), "isa9_reason_30");
        assert_eq!(names.source(9), "built-in");
        assert_eq!(ExitReasonNames::isa_name(1), "vmx");
        assert_eq!(ExitReasonNames::isa_name(2), "svm");
        assert_eq!(ExitReasonNames::isa_name(3), "pvm");
        assert_eq!(ExitReasonNames::isa_name(4), "isa4");
    }

    /// Sources of all three ISAs, for the cases below.
    fn sources(text: &str) -> [&'static str; 3] {
        let names = ExitReasonNames::from_print_fmt(text);
        [names.source(1), names.source(2), names.source(3)]
    }

    const BUILTIN: [&str; 3] = ["built-in"; 3];

    #[test]
    fn tables_it_cannot_attribute_are_left_out() {
        // 2.6.3x: the names come from a kernel array, so the format has no table.
        let linux_2_6 = r#""reason %s rip 0x%lx", ftrace_print_symbols_seq(p, REC->exit_reason, kvm_x86_ops->exit_reasons_str), REC->guest_rip"#;
        assert_eq!(sources(linux_2_6), BUILTIN);
        // One table and no isa test: which ISA's is it?
        let one_table =
            r#""reason %s", __print_symbolic(REC->exit_reason, { 0, "EXCEPTION_NMI" })"#;
        assert_eq!(sources(one_table), BUILTIN);
        // An isa test that is not what the `?` applies to.
        let other_test = r#""%s", (REC->isa == 1 && REC->x) ? __print_symbolic(REC->exit_reason, { 0, "A" }) : """#;
        assert_eq!(sources(other_test), BUILTIN);
        // A table of something else than the exit reason.
        let other_value = r#"(REC->isa == 1) ? __print_symbolic(REC->vector, { 0, "A" }) : "x""#;
        assert_eq!(sources(other_value), BUILTIN);
    }

    #[test]
    fn isa_names_and_nested_ternaries() {
        // KVM_ISA_* left unexpanded, e.g. if they were ever an enum.
        let named = r#"(REC->isa == KVM_ISA_VMX) ? __print_symbolic(REC->exit_reason & 0xffff, { 30, "IO" }) : __print_symbolic(REC->exit_reason, { 0x07b, "io" })"#;
        let names = ExitReasonNames::from_print_fmt(named);
        assert_eq!(names.name(1, 30), "IO");
        assert_eq!(names.name(1, 12), "reason_12"); // the host's table replaces the built-in one whole
        assert_eq!(names.name(2, 0x7b), "io");
        // The PVM RFC's trace.h (patch 42/73): (isa == VMX) ? VMX : ((isa == SVM) ? SVM : PVM),
        // with its PVM values as the preprocessor leaves them. The tables are cut short here.
        let pvm_rfc = r#""vcpu %u reason %s%s%s", REC->vcpu_id, (REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }) : ((REC->isa == 2) ? __print_symbolic(REC->exit_reason, { 0x000, "read_cr0" }, { 0x040 + 14, "PF excp" }) : __print_symbolic(REC->exit_reason, { 14, "PF excp" }, { (1UL << 16), "SYSCALL" }, { (4UL << 16), "INTERRUPT" }, { 1025, "FAILED_VMENTRY" })), (REC->isa == 1 && REC->exit_reason & ~0xffff) ? " " : """#;
        let names = ExitReasonNames::from_print_fmt(pvm_rfc);
        assert_eq!(sources(pvm_rfc), ["format file"; 3]);
        assert_eq!(names.name(1, 0), "EXCEPTION_NMI");
        assert_eq!(names.name(2, 0x4e), "PF excp");
        assert_eq!(names.name(3, 1 << 16), "SYSCALL");
        assert_eq!(names.name(3, 4 << 16), "INTERRUPT");
        assert_eq!(names.name(3, 1025), "FAILED_VMENTRY");
        // SVM's then-branch and VMX's else-branch, the other way round.
        let swapped = r#"(REC->isa == 2) ? __print_symbolic(REC->exit_reason, { 0x07b, "io" }) : __print_symbolic(REC->exit_reason & 0xffff, { 30, "IO" })"#;
        let names = ExitReasonNames::from_print_fmt(swapped);
        assert_eq!(
            (names.name(1, 30), names.name(2, 0x7b)),
            ("IO".into(), "io".into())
        );
    }

    #[test]
    fn garbage_never_panics_and_falls_back() {
        for text in [
            "",
            "garbage",
            "__print_symbolic(",
            "__print_symbolic()",
            "(REC->isa == 1) ? __print_symbolic(REC->exit_reason, {",
            r#"(REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 0x, "x" })"#,
            r#"(REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 1, "x }"#,
            r#"(REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 0x100000000, "x" })"#,
            r#"(REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 1 << 99, "x" })"#,
            r#"(REC->isa == 1) ? __print_symbolic(REC->exit_reason, { 1, "x" }"#,
            "(REC->isa == ) ? __print_symbolic(REC->exit_reason))",
            "isa == 99999999999999999999 ? __print_symbolic(exit_reason, { 1, \"x\" }) :",
            "isa==1?__print_symbolic(exit_reason,{ é, \"ü\" })",
        ] {
            assert_eq!(sources(text), BUILTIN, "{text:?}");
        }
        let deep = format!(
            "(REC->isa == 1) ? __print_symbolic(REC->exit_reason, {{ {}1, \"x\" }})",
            "(".repeat(100_000)
        );
        assert_eq!(sources(&deep), BUILTIN);
        // Every prefix of a real print fmt: tables cut short fall back, complete ones are used.
        let full = print_fmt(LINUX_6_18);
        for (cut, _) in full.char_indices() {
            let names = ExitReasonNames::from_print_fmt(&full[..cut]);
            if names.source(2) == "format file" {
                assert_eq!(names.source(1), "format file");
                assert_eq!(names.svm.names.len(), 110);
            }
            if names.source(1) == "format file" {
                assert_eq!(names.vmx.names.len(), 65);
            }
        }
    }

    #[test]
    fn entry_values() {
        assert_eq!(eval("0"), Some(0));
        assert_eq!(eval("30"), Some(30));
        assert_eq!(eval("0x07b"), Some(0x7b));
        assert_eq!(eval("0x040 + 14"), Some(0x4e));
        assert_eq!(eval("-1"), Some(u32::MAX));
        assert_eq!(eval("0x80000001"), Some(0x8000_0001));
        assert_eq!(eval("(1UL << 16)"), Some(0x1_0000));
        assert_eq!(eval("((2UL << 16) + 1)"), Some(0x2_0001));
        assert_eq!(eval("010"), Some(8));
        for bad in [
            "",
            "1 +",
            "0x",
            "08",
            "x",
            "(1",
            "0x100000000",
            "-0x80000001",
            "1 << 64",
            "1 | 4",
        ] {
            assert_eq!(eval(bad), None, "{bad:?}");
        }
    }
}
