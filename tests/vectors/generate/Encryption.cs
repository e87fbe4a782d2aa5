// Encrypted script files: what Tentacle writes for a ScriptFile that has an
// EncryptionPassword (Octopus.Tentacle.Core ScriptWorkspaceFactory.SaveFileToDisk
// and Util/Security/AesEncryption.cs): the stream is read as text by a
// default StreamReader (UTF-8, byte order marks honoured and consumed), and
// the text's UTF-8 bytes are written as "IV__" + IV + AES-128-CBC/PKCS#7
// under key = PBKDF2-HMAC-SHA1(password, "Octopuss", 1000 iterations, 16 bytes).
//
// Tentacle draws a random IV; here each case fixes one so the output is
// deterministic. Written to encryption_vectors.json as base64.
using System;
using System.Collections.Generic;
using System.IO;
using System.Security.Cryptography;
using System.Text;
using Newtonsoft.Json;

public static class EncryptionVectors
{
    static byte[] Key(string password)
    {
        using (var derive = new Rfc2898DeriveBytes(password, Encoding.UTF8.GetBytes("Octopuss"), 1000))
        {
            return derive.GetBytes(16);
        }
    }

    static Aes Algorithm(byte[] key, byte[] iv)
    {
        var aes = Aes.Create();
        aes.Mode = CipherMode.CBC;
        aes.Padding = PaddingMode.PKCS7;
        aes.KeySize = 128;
        aes.BlockSize = 128;
        aes.Key = key;
        aes.IV = iv;
        return aes;
    }

    static byte[] Encrypt(string password, byte[] iv, byte[] input)
    {
        string text;
        using (var reader = new StreamReader(new MemoryStream(input)))
        {
            text = reader.ReadToEnd();
        }
        var plain = Encoding.UTF8.GetBytes(text);
        using (var aes = Algorithm(Key(password), iv))
        using (var encryptor = aes.CreateEncryptor())
        using (var output = new MemoryStream())
        {
            var prefix = Encoding.UTF8.GetBytes("IV__");
            output.Write(prefix, 0, prefix.Length);
            output.Write(iv, 0, iv.Length);
            using (var crypto = new CryptoStream(output, encryptor, CryptoStreamMode.Write))
            {
                crypto.Write(plain, 0, plain.Length);
            }
            var result = output.ToArray();
            if (Decrypt(password, result) != text) throw new InvalidOperationException("round trip failed");
            return result;
        }
    }

    // AesEncryption.Decrypt, which Calamari mirrors.
    static string Decrypt(string password, byte[] encrypted)
    {
        var iv = new byte[16];
        Array.Copy(encrypted, 4, iv, 0, 16);
        using (var aes = Algorithm(Key(password), iv))
        using (var decryptor = aes.CreateDecryptor())
        using (var input = new MemoryStream(encrypted, 20, encrypted.Length - 20))
        using (var crypto = new CryptoStream(input, decryptor, CryptoStreamMode.Read))
        using (var reader = new StreamReader(crypto, Encoding.UTF8))
        {
            return reader.ReadToEnd();
        }
    }

    static byte[] Iv(int seed)
    {
        var iv = new byte[16];
        for (var i = 0; i < iv.Length; i++) iv[i] = (byte)(seed * 31 + i * 7);
        return iv;
    }

    public static void Write(string outDir)
    {
        var cases = new List<object[]>
        {
            new object[] { "ascii", "purple-monkey-dishwasher", Encoding.ASCII.GetBytes("FooBar") },
            new object[] { "empty", "p", new byte[0] },
            new object[] { "one_block", "s3cr3t", Encoding.ASCII.GetBytes("0123456789abcdef") },
            new object[] { "json_variables", "Pa\u00df w\u00f6rd \u2603",
                Encoding.UTF8.GetBytes("{\"Octopus.Action.Password\":\"h\u00fcnter2\",\"Multi\":\"line\\nvalue\"}\n") },
            new object[] { "utf8_bom", "bom", new byte[] { 0xEF, 0xBB, 0xBF, 0x61, 0x62, 0x63 } },
            new object[] { "utf16le_bom", "wide", new byte[] { 0xFF, 0xFE, 0x68, 0x00, 0xE9, 0x00, 0x3D, 0x26 } },
            new object[] { "utf16be_bom", "wide", new byte[] { 0xFE, 0xFF, 0x00, 0x68, 0x00, 0xE9, 0x26, 0x3D } },
            new object[] { "crlf_lines", "x", Encoding.ASCII.GetBytes("a=1\r\nb=2\r\n") },
        };
        var entries = new List<string>();
        var seed = 1;
        foreach (var c in cases)
        {
            var name = (string)c[0];
            var password = (string)c[1];
            var input = (byte[])c[2];
            var iv = Iv(seed++);
            var output = Encrypt(password, iv, input);
            entries.Add("  {\"name\": " + JsonConvert.ToString(name)
                + ", \"password\": " + JsonConvert.ToString(password)
                + ", \"iv\": \"" + Convert.ToBase64String(iv) + "\""
                + ", \"key\": \"" + Convert.ToBase64String(Key(password)) + "\""
                + ", \"input\": \"" + Convert.ToBase64String(input) + "\""
                + ", \"output\": \"" + Convert.ToBase64String(output) + "\"}");
        }
        File.WriteAllText(Path.Combine(outDir, "encryption_vectors.json"), "[\n" + string.Join(",\n", entries) + "\n]\n");
    }
}
