# Homebrew formula for pexi on macOS (Apple Silicon): the `pexi` command (the PEP and `pexi vm run`, which
# boots the guest with vfkit). It is not in homebrew-core; install it from a tap of your own (docs/macos.md):
#
#   brew tap-new "$USER/pexi" && cp packaging/homebrew/pexi.rb "$(brew --repository "$USER/pexi")/Formula/"
#   brew install --HEAD "$USER/pexi/pexi"
#
# host/tests/packaging.rs checks it on every commit: it loads this file with a stand-in for Homebrew's
# formula DSL (packaging/homebrew/check.rb), compares what it declares with the repository, and runs its
# `test do` block against the `pexi` the suite built.
class Pexi < Formula
  desc "Policy enforcement point for an AI agent in a VM with no network"
  homepage "https://example.invalid/pexi"
  license "Apache-2.0"
  head "https://example.invalid/pexi.git", branch: "main"

  depends_on "rust" => :build
  depends_on arch: :arm64
  depends_on :macos
  # Boots the guest with Apple's Virtualization.framework (`[vm] runner = "vfkit"`, the default on macOS).
  depends_on "vfkit"

  def install
    system "cargo", "install", *std_cargo_args(path: "host")
    # The default config (also compiled in) and the policy bundle with its tests, for reference and
    # `pexi policy test`.
    pkgshare.install "host/default-config.toml", "policies"
  end

  test do
    assert_match(/^pexi \d+\.\d+\.\d+/, shell_output("#{bin}/pexi --version"))
    # Deny by default: the embedded policy refuses a host on no list (exit status 1), with its reason.
    assert_match "is not in the allowlist", shell_output("#{bin}/pexi check GET https://example.com/ 2>&1", 1)
    system bin/"pexi", "policy", "test", pkgshare/"policies"
  end
end
