# Homebrew formula for kiln, for a tap (homebrew-core takes tools once they are notable):
#   brew tap kiln-project/kiln https://github.com/kiln-project/kiln   # a repository with Formula/kiln.rb
#   brew install kiln
# The macOS CI job (.github/workflows/macos.yml) installs this file from a local tap with `url`
# and `sha256` pointed at the commit under test, then runs `brew test` and `brew audit`. The
# homepage and release URL are placeholders until kiln has a public home; no license is declared
# because the project has not chosen one yet.
class Kiln < Formula
  desc "Build, customise, flash and serve the OS images of small clusters"
  homepage "https://github.com/kiln-project/kiln"
  url "https://github.com/kiln-project/kiln/archive/refs/tags/v0.1.0.tar.gz"
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  head "https://github.com/kiln-project/kiln.git", branch: "main"

  depends_on "rust" => :build
  # mke2fs and debugfs: kiln edits ext4 roots and makes sample bases with them.
  depends_on "e2fsprogs"

  def install
    system "cargo", "install", *std_cargo_args
    generate_completions_from_executable(bin/"kiln", "completions")
    (man1/"kiln.1").write Utils.safe_popen_read(bin/"kiln", "manpage")
    pkgshare.install "examples", "images", "overlays"
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/kiln --version")
    # kiln's main job on its embedded sample base: no network, no hardware. e2fsprogs is keg-only.
    ENV.prepend_path "PATH", Formula["e2fsprogs"].opt_sbin
    cp_r pkgshare/"examples", testpath
    system bin/"kiln", "check", "--cluster", testpath/"examples/ceil/cluster.toml"
    system bin/"kiln", "build", "--cluster", testpath/"examples/ceil/cluster.toml",
           "--node", "ceil-one", "--base", "sample", "--out", testpath/"out"
    assert_path_exists testpath/"out/ceil-one.img.bmap"
    sum = (testpath/"out/ceil-one.img.sha256sum").read.split.first
    assert_equal sum, Digest::SHA256.file(testpath/"out/ceil-one.img").hexdigest
  end
end
